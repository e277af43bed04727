"""The score stores' size is known before any job: the formula against stores the extraction really
writes, the sizes a dry run states, and a run refused before any job when its stores cannot fit
the free disk (README, Configuration)."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, snakemake
from eigenattn.config import disk, plan, settings
from eigenattn.config.settings import ModelFacts
from eigenattn.config.validation import check_model_facts, check_store_room, validate
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


def test_extraction_refuses_a_store_that_cannot_fit_before_writing_it(tmp_path, monkeypatch):
    from eigenattn.capture.extract import extract_scores

    monkeypatch.setenv(sizes.FREE_ENV, "2.001")  # 1 MB beyond the 2 GB headroom
    out = tmp_path / "shard-0.zarr"
    with pytest.raises(ConfigError) as e:
        extract_scores(
            build("bert", tmp_path / "bert"),
            texts(64, words=200),
            list(range(64)),
            out,
            seq_len=128,  # 64 sequences x 2 layers x 4 heads x 128² x 4 bytes, and the rest: 33.7 MB
            dtype="float32",
            batch_size=8,
            chunk_sequences=8,
            device="cpu",
            autocast="none",
            layers="all",
            compression="none",
            progress=False,
            check_size=lambda nbytes: check_store_room("tiny", out, nbytes),
        )
    assert e.value.key == "models.tiny.layers" and "needs 33.7 MB" in str(e.value)
    assert "fewer sequences (sampling.n_sequences)" in e.value.fix
    assert not out.exists() and not list(tmp_path.glob(".shard-0.zarr.partial-*"))


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


def test_planned_stores_of_the_default_config():
    c = _default_config()
    stores = disk.score_stores(c)
    by = {(s.model, s.part): s for s in stores if s.part != "scaling"}
    assert set(by) == {
        ("minilm", "fit"),
        ("minilm", "heldout"),
        ("smollm2", "fit"),
        ("smollm2", "heldout"),
        ("trained_mlm", "fit"),
    }
    s = by[("smollm2", "fit")]
    assert (s.N, s.layers, s.heads, s.n, s.dtype) == (384, 30, 9, 128, "float16")
    assert s.nbytes == pytest.approx(384 * 30 * 9 * 128**2 * 2, rel=1e-3)
    # the scaling study at most max_layers (6) layers, and not at the main run's point
    assert {s.layers for s in stores if s.part == "scaling"} == {6}
    lines = disk.size_lines(c, stores)
    assert lines[2] == "smollm2 fit: 384 sequences × 30 layers × 9 heads × 128² × float16 = 3.4 GB"
    assert lines[-1].startswith("score stores in all: 10.1 GB")


def test_a_model_without_declared_heads_has_no_size_before_it_is_fetched():
    c = _default_config()
    del c["models"]["smollm2"]["heads"]
    lines = disk.size_lines(c, disk.score_stores(c))
    assert "smollm2 fit: size unknown before the model is fetched (models.smollm2.heads not set)" in lines[2]
    assert "plus the stores of unknown size" in lines[-1]


def test_stores_already_written_are_not_counted_against_the_disk(monkeypatch):
    c = _default_config(seq_len=2048)
    stores = disk.score_stores(c)
    monkeypatch.setenv(sizes.FREE_ENV, "3")
    disk.check_room(c, stores, lambda s: True, "results/")  # a finished run: nothing left to write
    with pytest.raises(ConfigError) as e:
        disk.check_room(c, stores, lambda s: False, "results/")
    assert e.value.key == "sampling.seq_len"


def _smollm2_2048(tmp_path, store="scores") -> list[str]:
    cfg = tmp_path / "smollm2-2048.yaml"
    cfg.write_text(
        yaml.safe_dump({"run_models": ["smollm2"], "sampling": {"seq_len": 2048}, "extraction": {"store": store}})
    )
    return [str(REPO / "config.yaml"), str(cfg)]


def test_dry_run_states_the_size_of_each_store(tmp_path, monkeypatch):
    monkeypatch.setenv(sizes.FREE_ENV, "2000")
    proc = snakemake(tmp_path, "-n", configs=_smollm2_2048(tmp_path))
    out = proc.stdout + proc.stderr
    assert "smollm2 fit: 384 sequences × 30 layers × 9 heads × 2048² × float16 = 870 GB" in out
    assert "smollm2 heldout: 32 sequences × 30 layers × 9 heads × 2048² × float16 = 72.5 GB" in out
    assert "score stores in all: 958 GB" in out  # 942 GB of smollm2, the trained encoder and the scaling study
    assert "free disk at results/: 2 TB (1.8 TB usable after the headroom)" in out


def test_dry_run_refuses_stores_that_cannot_fit_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setenv(sizes.FREE_ENV, "500")
    proc = snakemake(tmp_path, "-n", configs=_smollm2_2048(tmp_path), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'sampling.seq_len': the score stores still to write need 958 GB" in out
    assert "(the largest part: smollm2, 945 GB)" in out
    assert "keep fewer layers (models.smollm2.layers: a list of layer indices)" in out
    assert "a shorter sampling.seq_len" in out
    assert "stream the model's statistics instead of storing its scores (extraction.store: stream" in out
    assert "Job stats" not in out and not (tmp_path / "results").exists()


def test_dry_run_with_store_auto_plans_streamed_mode(tmp_path, monkeypatch):
    """The same run with extraction.store: auto (the default) streams smollm2: no score store of it
    is planned, its moments and token stores are, and the run fits the same disk."""
    monkeypatch.setenv(sizes.FREE_ENV, "500")
    proc = snakemake(tmp_path, "-n", configs=_smollm2_2048(tmp_path, "auto"))
    out = proc.stdout + proc.stderr
    assert "smollm2 fit:" not in out and "smollm2 heldout:" not in out
    assert "smollm2: streamed (its score stores would take 942 GB, over extraction.store_budget_gb 50)" in out
    assert "2 layer group(s) × 1 shard(s) of fit moments, row moments 3.4 GB per job" in out
    assert re.search(r"stream_moments\s+2\b", out) and re.search(r"extract_tokens\s+2\b", out), out[-3000:]
    assert re.search(r"^extract_scores\s+1\b", out, re.M)  # the trained encoder only (stored: 12.9 GB)
