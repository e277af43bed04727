"""The score stores' size is known before any job: the formula against stores the extraction really
writes."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from eigenattn.config import plan, settings
from eigenattn.config.settings import ModelFacts
from eigenattn.config.validation import check_model_facts, validate
from eigenattn.errors import ConfigError
from eigenattn.storage import sizes
from tiny_models import build, texts


def _data_bytes(store: Path) -> int:
    """Bytes of the scores' shard files (its chunks, checksums and indexes; no metadata)."""
    return sum(p.stat().st_size for p in (store / "scores" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "family,dtype,n_seq,batch,chunk",
    [
        ("qwen2", "float32", 7, 4, 2),  # grouped-query heads; a last shard half full, a chunk never written
        ("gpt_oss", "auto", 5, 4, 4),  # attention sinks (the extra sinks array); dtype decided by the probe
    ],
)
def test_formula_matches_a_store_the_extraction_writes(tmp_path, family, dtype, n_seq, batch, chunk):
    import zarr

    from eigenattn.capture.extract import extract_scores

    out = tmp_path / "shard-0.zarr"
    stats = extract_scores(
        build(family, tmp_path / family),
        texts(n_seq),
        list(range(n_seq)),
        out,
        seq_len=16,
        dtype=dtype,
        batch_size=batch,
        chunk_sequences=chunk,
        device="cpu",
        autocast="none",
        layers="all",
        compression="none",
        progress=False,
    )
    g = zarr.open_group(str(out), mode="r")
    L, H = len(g.attrs["layers"]), g.attrs["heads"]
    itemsize = sizes.ITEMSIZE[g.attrs["dtype"]]
    assert _data_bytes(out) == sizes.score_array_bytes(n_seq, L, H, 16, itemsize, chunk, batch)
    planned = sizes.score_store_bytes(n_seq, L, H, 16, g.attrs["dtype"], chunk, batch, sinks="sinks" in g)
    assert stats["bytes_planned"] == planned
    assert stats["bytes_stored"] <= planned <= stats["bytes_stored"] + sizes.METADATA + 4096


def test_declared_layers_and_heads_are_checked_against_the_model():
    facts = {"n_layers": 30, "heads": 9, "causal": True, "mask_kinds": "causal"}
    check_model_facts(ModelFacts("m", "all", True, 30, 9), facts)
    check_model_facts(ModelFacts("m", "all", True), facts)  # not declared: nothing to check
    with pytest.raises(ConfigError, match=r"models\.m\.heads': is 12, but the model has 9 query heads"):
        check_model_facts(ModelFacts("m", "all", True, 30, 12), facts)


def test_declaring_layers_and_heads_re_runs_nothing():
    c = _default_config()
    assert plan.model_shape(c, "smollm2") == (30, 9) and plan.model_shape(c, "trained_mlm") == (2, 2)
    recorded = settings.Extraction.from_config(c, "smollm2", "fit", 0, 1, 128).params()["source"]
    assert not set(plan.SHAPE_KEYS) & set(recorded) and recorded == plan.recorded_spec(c, "smollm2")


def _default_config(**sampling):
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["sampling"].update(sampling)
    return validate(c)
