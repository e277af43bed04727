"""Real snakemake runs: the data contract of the stores on tests/config.yaml, dry runs, lint."""

import subprocess
import sys

import numpy as np
import pandas as pd
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


def test_eigen_stage_outputs(tiny_run):
    wd, _ = tiny_run
    n = TINY["sampling"]["seq_len"]
    N = TINY["sampling"]["n_sequences"]["fit"]
    expect = {("minilm", "all"): (6, 12, n), ("minilm", "prefix"): (6, 12, n // 2),
              ("smollm2", "prefix"): (4, 9, n // 2)}
    assert sorted(p.name for p in (wd / "results" / "eigen" / "smollm2").iterdir()) == ["prefix"]
    for (model, view), (L, H, d) in expect.items():
        base = wd / "results" / "eigen" / model / view
        rows = zarr.open_group(base / "rows.zarr", mode="r")
        for variant in ("raw", "row_centered"):
            g = rows[variant]
            assert g["mean"].shape == (L, H, d) and g["eigenvalues"].shape == (L, H, d)
            assert g["eigenvectors"].shape == (L, H, d, d) and g["count"].shape == (L, H)
            assert g["pooled/eigenvalues"].shape == (L, d) and g["pooled/eigenvectors"].shape == (L, d, d)
            w = g["eigenvalues"][:]
            assert (np.diff(w, axis=-1) <= 1e-9 * w[..., :1]).all()  # descending
            rows_per_seq = n if view == "all" else n // 2
            assert (g["count"][:] == N * rows_per_seq).all()
        full = zarr.open_group(base / "full.zarr", mode="r")
        assert full["eigenvalues"].shape == (L, H, N - 1) and full["total_variance"].shape == (L, H)
        assert full.attrs["n_samples"] == N
        df = pd.read_csv(base / "spectrum.csv")
        assert set(df.analysis) == {"rows", "full"} and set(df.variant) == {"raw", "row_centered"}
        assert {f"ev_at_{k}" for k in (1, 2, 4, 8, 16, 32)} <= set(df.columns)
        assert (df.k90 <= df.k95).all() and (df.k95 <= df.k99).all() and (df.k99 <= df.d).all()
        np.testing.assert_allclose(
            df[(df.analysis == "rows") & (df["head"] != "pooled")].total_variance.sum(),
            sum(rows[v]["eigenvalues"][:].sum() for v in ("raw", "row_centered")), rtol=1e-9)
    assert (wd / "benchmarks" / "out" / "eigen_rows" / "minilm" / "all.tsv").is_file()


def test_reconstruction_and_plugin_outputs(tiny_run):
    wd, _ = tiny_run
    n = TINY["sampling"]["seq_len"]
    sizes = TINY["reconstruction"]["subset_sizes"]
    cols = ["model", "view", "layer", "head", "estimator", "strategy", "subset_size", "basis_source",
            "rel_error", "rel_error_centered", "tv", "kl", "top1"]
    for model, view, L, H in [("minilm", "all", 6, 12), ("minilm", "prefix", 6, 12), ("smollm2", "prefix", 4, 9)]:
        df = pd.read_csv(wd / "results" / "reconstruction" / model / f"{view}.csv")
        assert list(df.columns) == cols
        same = df[df.basis_source == "same"]
        assert len(same) == L * H * 4 * 3 * len(sizes)
        sources = set(df.basis_source)
        assert {s for s in sources if s.startswith("layer:")}
        other = "smollm2" if model == "minilm" else "minilm"
        assert (f"model:{other}" in sources) == (view == "prefix")
        assert same.tv.between(0, 1).all() and same.top1.between(0, 1).all()
        est = same[same.estimator != "subset_only"]
        assert est.rel_error.notna().all() and (est.rel_error >= 0).all()
        # the error falls with s for the conditional Gaussian (median over heads)
        med = same[same.estimator == "conditional_gaussian"].groupby("subset_size").rel_error.median()
        assert med.is_monotonic_decreasing, med
        assert (wd / "benchmarks" / "out" / "reconstruct" / model / f"{view}.tsv").is_file()
    for model, metric in [("minilm", "embedding_cosine"), ("smollm2", "perplexity")]:
        df = pd.read_csv(wd / "results" / "plugin" / f"{model}.csv")
        assert list(df.columns) == ["model", "estimator", "strategy", "subset_size", "metric", "value",
                                    "exact_value", "ratio"]
        assert set(df.metric) == {metric}
        assert len(df) == 3 * 1 * len(TINY["plugin"]["subset_sizes"])
        np.testing.assert_allclose(df.ratio, df.value / df.exact_value, rtol=1e-9)
        if metric == "perplexity":
            assert (df.exact_value > 1).all() and (df.ratio > 0.5).all()
        else:
            assert df.value.between(-1, 1).all()
    assert n // 2 >= max(sizes)


def test_rerun_is_a_noop(tiny_run):
    wd, _ = tiny_run
    proc = snakemake(wd, "-n", "all")
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
