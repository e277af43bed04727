"""Real snakemake runs: the data contract of the stores on tests/config.yaml, dry runs, lint."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from conftest import REPO, snakemake

TINY = yaml.safe_load((REPO / "tests" / "config.yaml").read_text())


def test_default_config_dry_run(tmp_path):
    proc = snakemake(tmp_path, "-n", configs=[str(REPO / "config.yaml")])
    assert "extract_scores" in proc.stdout and "fetch_model" in proc.stdout


def test_extract_stage_layout(tiny_run):
    wd, _ = tiny_run
    n = TINY["sampling"]["seq_len"]
    passages = pd.read_parquet(wd / "results" / "corpus" / "enwiki-sample" / "passages.parquet")
    assert passages.groupby("split").size().to_dict() == TINY["sampling"]["n_sequences"]
    expect = {"minilm": (list(range(6)), 12, 12, False), "smollm2": ([0, 1, 15, 29], 9, 3, True)}
    for model, (layers, heads, kv_heads, causal) in expect.items():
        for split in ("fit", "heldout"):
            seen = []
            shards = sorted((wd / "results" / "scores" / model / split).iterdir())
            assert [p.name for p in shards] == ["shard-0.zarr", "shard-1.zarr"]  # no partial leftovers
            for shard in shards:
                g = zarr.open_group(shard, mode="r")
                a = g.attrs
                N = g["passage_id"].shape[0]
                assert g["scores"].shape == (N, len(layers), heads, n, n)
                assert g["scores"].dtype == np.float16
                assert g["scores"].chunks == (TINY["extraction"]["batch_size"], 1, heads, n, n)
                assert g["scores"].compressors  # compressed
                assert g["input_ids"].shape == (N, n) and g["input_ids"].dtype == np.int32
                assert g["attention_mask"].dtype == np.int8 and (g["attention_mask"][:] == 1).all()
                assert g["passage_id"].dtype == np.int64
                assert a["layers"] == layers and a["heads"] == heads and a["kv_heads"] == kv_heads
                assert a["head_dim"] in (32, 64) and a["seq_len"] == n and a["causal"] is causal
                assert a["model"] == model and a["split"] == split and a["corpus"] == "enwiki-sample"
                assert a["dtype"] == "float16" and a["seed"] == 0 and a["complete"] is True
                assert "sha256" in a["source"] and "Q K^T" in a["score_definition"]
                assert a["eigenattn_version"]
                s = g["scores"][:]
                assert np.isfinite(s).all()
                seen.extend(g["passage_id"][:].tolist())
            ids = passages.loc[passages.split == split, "passage_id"].tolist()
            assert sorted(seen) == ids
    assert (wd / "logs" / "extract" / "minilm" / "fit" / "shard-0.log").stat().st_size > 0
    assert (wd / "benchmarks" / "out" / "extract" / "minilm" / "fit" / "shard-0.tsv").is_file()


def test_rerun_is_a_noop(tiny_run):
    wd, _ = tiny_run
    proc = snakemake(wd, "-n", "extract")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_same_seed_same_tokens(tiny_run, tmp_path, resources):
    """A second, independent run with the same config yields identical passages and input_ids."""
    wd, _ = tiny_run
    (tmp_path / "resources").symlink_to(resources, target_is_directory=True)
    snakemake(tmp_path, "-c2", "results/scores/minilm/fit/shard-0.zarr")
    a = pd.read_parquet(wd / "results" / "corpus" / "enwiki-sample" / "passages.parquet")
    b = pd.read_parquet(tmp_path / "results" / "corpus" / "enwiki-sample" / "passages.parquet")
    pd.testing.assert_frame_equal(a, b)
    ga = zarr.open_group(wd / "results/scores/minilm/fit/shard-0.zarr", mode="r")
    gb = zarr.open_group(tmp_path / "results/scores/minilm/fit/shard-0.zarr", mode="r")
    np.testing.assert_array_equal(ga["input_ids"][:], gb["input_ids"][:])
    np.testing.assert_array_equal(ga["scores"][:], gb["scores"][:])


def test_lint_and_format_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
