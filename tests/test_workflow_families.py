"""Real `snakemake extract` runs on tiny random-weight models given as `source: path` models.

By default two families run (about a minute on 2 cores): Mistral (sliding window shorter than
seq_len: passes the oracle) and BLOOM (ALiBi in its own code: refused). The in-process tests of
tests/test_architectures.py cover every family. ``EIGENATTN_ALL_FAMILIES=1`` runs all of them here (a few
minutes on 2 cores). Every passing store must reproduce eager ``output_attentions``; every refused
model must leave no store (nor a ``.partial-*`` leftover) and a log that names the cause.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import yaml
import zarr

from conftest import make_workdir, snakemake
from tiny_models import FAMILIES, build, eager_attentions, store_probabilities

SEQ_LEN = 16
DEFAULT = ["mistral", "bloom"]
NAMES = list(FAMILIES) if os.environ.get("EIGENATTN_ALL_FAMILIES") == "1" else DEFAULT
CAUSAL = {
    "bert": False,
    "albert": False,
    "distilbert": False,
    "modernbert": False,
    "t5_encoder": False,
    "deberta_v2": False,
    "t5": False,
    "bart": False,
}


def test_extract_refuses_or_reproduces_each_family(tmp_path, resources):
    wd = make_workdir(tmp_path / "wd", resources)
    models = {}
    for name in NAMES:
        src = build(name, tmp_path / "src" / name)
        models[f"tiny_{name}"] = {"source": "path", "path": str(src), "causal": CAUSAL.get(name, True)}
    overlay = {
        "run_models": list(models),
        "models": models,
        "sampling": {"seq_len": SEQ_LEN, "n_sequences": {"fit": 4, "heldout": 2}},
        "extraction": {"batch_size": 2, "chunk_sequences": 2, "shards": 1, "dtype": "float32"},
        "plugin": {"n_sequences": 2},
        "eigen": {"report_k": [2, 4, 8]},
        "scaling": {"models": []},
        "reconstruction": {"transfer": ["adjacent_layer"]},
    }
    cfg = tmp_path / "families.yaml"
    cfg.write_text(yaml.safe_dump(overlay))
    from conftest import CONFIGS

    proc = snakemake(wd, "-c2", "--keep-going", "extract", configs=[*CONFIGS, str(cfg)], check=False, timeout=1500)
    assert "invalid configuration" not in proc.stderr, proc.stderr[-2000:]
    results = {}
    for key in models:
        name = key.removeprefix("tiny_")
        refusal = FAMILIES[name][2]
        for split in ("fit", "heldout"):
            store = wd / "results" / "scores" / key / split / "shard-0.zarr"
            log = (wd / "logs" / "extract" / key / split / "shard-0.log").read_text()
            if refusal:
                leftovers = list(store.parent.glob("*")) if store.parent.exists() else []
                assert leftovers == [], f"{key}: a refused model left {leftovers}"
                first = next(line for line in log.splitlines() if "is refused" in line)
                assert re.search(refusal, log, re.S) and f"model '{key}' at resources/models/{key}" in first, log[
                    -3000:
                ]
                assert "fix: " in log
                results[key] = "refused: " + first.split("is refused: ", 1)[1]
            else:
                assert store.is_dir(), f"{key}: no store\n{log[-3000:]}"
                g = zarr.open_group(store, mode="r")
                ref = eager_attentions(wd / "resources" / "models" / key, g["input_ids"][:], g.attrs["layers"])
                err = float(np.abs(store_probabilities(store) - ref).max())
                assert err <= 1e-5, f"{key} {split}: oracle error {err:.2e}"
                results[key] = f"passes, max oracle error {err:.2e}, masks {g.attrs['layer_masks']}"
    for key, res in results.items():
        print(f"{key}: {res}")
    assert (proc.returncode != 0) == any(FAMILIES[k.removeprefix("tiny_")][2] for k in models), proc.stderr[-3000:]


@pytest.mark.parametrize("view,expect", [("prefix", [1])])
def test_eigen_skips_sliding_window_layers(tmp_path, resources, view, expect):
    """Gemma 2 alternates sliding-window (layer 0) and global layers: the eigen stage keeps layer 1 only."""
    wd = make_workdir(tmp_path / "wd", resources)
    src = build("gemma2", tmp_path / "src" / "gemma2")
    overlay = {
        "run_models": ["tiny_gemma2"],
        "models": {"tiny_gemma2": {"source": "path", "path": str(src), "causal": True}},
        "sampling": {"seq_len": SEQ_LEN, "n_sequences": {"fit": 4, "heldout": 2}},
        "extraction": {"batch_size": 2, "chunk_sequences": 2, "shards": 1},
        "plugin": {"n_sequences": 2},
        "eigen": {"report_k": [2, 4, 8]},
        "scaling": {"models": []},
        "reconstruction": {"transfer": ["adjacent_layer"]},
    }
    cfg = tmp_path / "gemma2.yaml"
    cfg.write_text(yaml.safe_dump(overlay))
    from conftest import CONFIGS

    target = f"results/eigen/tiny_gemma2/{view}/rows.zarr"
    snakemake(wd, "-c2", target, configs=[*CONFIGS, str(cfg)], timeout=900)
    g = zarr.open_group(wd / target, mode="r")
    assert g.attrs["layers"] == expect
    assert [s["layer"] for s in g.attrs["skipped_layers"]] == [0]
    assert "sliding window of 4" in g.attrs["skipped_layers"][0]["reason"]
    assert (
        "layer 0 skipped in view 'prefix'" in (wd / "logs" / "eigen_rows" / "tiny_gemma2" / f"{view}.log").read_text()
    )
