"""Real snakemake runs: the data contract of the stores on tests/config.yaml, dry runs, lint."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from conftest import REPO, make_workdir, snakemake

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


def test_training_outputs(tiny_run):
    wd, _ = tiny_run
    t = TINY["training"]
    s = pd.read_csv(wd / "results" / "training" / "summary.csv")
    for c in ["mode", "variant", "subset_size", "seed", "steps", "heldout_mlm_acc", "heldout_loss", "params",
              "attention_flops_per_seq", "mean_step_time_ms"]:
        assert c in s.columns
    n = TINY["sampling"]["seq_len"]
    expect = {(m, "exact", n) for m in ("scratch", "finetune")} | {
        (m, v, sz) for m in ("scratch", "finetune") for v in ("partial_fixed", "partial_learned", "subset_only",
                                                            "linformer") for sz in t["subset_sizes"]}
    assert set(zip(s["mode"], s.variant, s.subset_size)) == expect
    assert (s[s.variant == "exact"].groupby("mode").seed.nunique() == 2).all()
    assert (s.steps == t["steps"]).all() and s.heldout_mlm_acc.between(0, 1).all()
    ex = s[s.variant == "exact"].attention_flops_per_seq.iloc[0]
    assert (s[s.variant != "exact"].attention_flops_per_seq < ex).all()
    run = wd / "results" / "training" / "finetune" / "partial_fixed" / f"s{t['subset_sizes'][0]}" / "seed0"
    m = pd.read_csv(run / "metrics.csv")
    assert list(m.columns) == ["step", "train_loss", "heldout_loss", "heldout_mlm_acc", "lr", "step_time_ms"]
    assert m.step.iloc[0] == 0 and np.isfinite(m.heldout_mlm_acc.iloc[0])  # evaluated before fine-tuning
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()
    final = json.loads((run / "final.json").read_text())
    assert final["heldout_mlm_acc"] == pytest.approx(m.heldout_mlm_acc.dropna().iloc[-1])
    # the trained exact encoder was analysed by the ordinary extraction and eigen rules
    rows = zarr.open_group(wd / "results" / "eigen" / "trained_mlm" / "all" / "rows.zarr", mode="r")
    assert rows["raw"]["eigenvalues"].shape == (2, 2, n)
    log = (wd / "logs" / "train" / "scratch" / "exact" / f"s{n}" / "seed0.log").read_text()
    assert f"scratch/exact/s{n}/seed0: 100%" in log and "loss=" in log  # the progress bar, with the loss


def _png_has_content(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return img.std() > 0.01


def test_notebooks_and_figures(tiny_run):
    wd, _ = tiny_run
    for name in ("spectrum", "overlap", "reconstruction", "training", "summary"):
        nb = json.loads((wd / "results" / "notebooks" / f"{name}.ipynb").read_text())
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
        assert any("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"])
        assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        figdir = wd / "results" / "figures" / name
        manifest = json.loads((figdir / "figures.json").read_text())
        assert manifest, name
        for fig in manifest:
            for ext in ("png", "svg"):
                f = figdir / f"{fig}.{ext}"
                assert f.stat().st_size > 5000, f
            assert _png_has_content(figdir / f"{fig}.png"), fig
        assert (wd / "results" / "report" / f"{name}.html").stat().st_size > 10000


def test_summary_table_equals_its_sources(tiny_run):
    """Every value of the claims table, recomputed here directly from the CSVs it cites."""
    wd, _ = tiny_run
    table = pd.read_csv(wd / "results" / "figures" / "summary" / "claims.csv")
    assert set(table.claim) == {"C1", "C2", "C3", "C4"}
    for r in table.itertuples():
        src = pd.read_csv(wd / r.source)
        if r.claim == "C1":
            model_view, analysis, variant = r.scope.split()[:3]
            model, view = model_view.split("/")
            x = src[(src.analysis == "rows") & (src.variant == variant) & (src["head"] != "pooled")]
            want = float(np.median(x.k90 / x.d))
        elif r.claim == "C2":
            k = int(r.quantity.split("k=")[1].split()[0])
            scope = r.scope.split()[1]
            pair, view = r.scope.split()[0].split("/")
            a, b = (pair.split("×") + [pair])[:2]
            x = src[(src.variant == "raw") & (src.k == k) & (src.scope == scope) & (src.model_a == a)
                    & (src.model_b == b) & (src.view == view)]
            want = float(x["median"].iloc[0])
        elif r.claim == "C3" and "plug-in" not in r.scope:
            sz = int(r.scope.split("s=")[1].split()[0])
            est, strat = r.scope.split("(")[1].rstrip(")").split(", ")
            x = src[(src.basis_source == "same") & (src.subset_size == sz) & (src.estimator == est)
                    & (src.strategy == strat)]
            want = float(x.tv.median())
        elif r.claim == "C3":
            sz = int(r.scope.split("s=")[1].split()[0])
            est, strat = r.scope.split("(")[1].rstrip(")").split(", ")
            x = src[(src.subset_size == sz) & (src.estimator == est) & (src.strategy == strat)]
            want = float(x.ratio.iloc[0] if x.metric.iloc[0] == "perplexity" else x.value.iloc[0])
        else:
            mode = r.scope.split()[0]
            if "exact" in r.scope:
                want = float(src[(src["mode"] == mode) & (src.variant == "exact")].heldout_mlm_acc.mean())
            else:
                v, sz = r.scope.split()[1], int(r.scope.split("s=")[1])
                want = float(src[(src["mode"] == mode) & (src.variant == v)
                                 & (src.subset_size == sz)].heldout_mlm_acc.mean())
        assert r.value == pytest.approx(want, rel=1e-9, abs=1e-12), r


def test_snakemake_report(tiny_run, tmp_path):
    wd, _ = tiny_run
    proc = snakemake(wd, "--report", "results/report.html")
    html = wd / "results" / "report.html"
    assert html.stat().st_size > 100_000, proc.stderr[-2000:]
    # after a partial run (no training, no training/summary notebooks) it covers what exists
    part = tmp_path / "partial"
    shutil.copytree(wd, part, symlinks=True, ignore=shutil.ignore_patterns("report.html"))
    shutil.rmtree(part / "results" / "training")
    for name in ("training", "summary"):
        (part / "results" / "notebooks" / f"{name}.ipynb").unlink()
        shutil.rmtree(part / "results" / "figures" / name)
    proc = snakemake(part, "--report", "results/report.html")
    out = proc.stdout + proc.stderr
    assert "tv_vs_s.png" in out and "accuracy_vs_s.png" not in out
    assert (part / "results" / "report.html").stat().st_size > 100_000


def test_rerun_is_a_noop(tiny_run):
    wd, _ = tiny_run
    proc = snakemake(wd, "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_same_seed_same_tokens(tiny_run, tmp_path, resources):
    """A second, independent run with the same config yields identical passages and input_ids."""
    wd, _ = tiny_run
    make_workdir(tmp_path, resources)
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
