"""The scaling study: power-law fits against a planted exponent, saturation of full-matrix k_p at a
true rank below N, and a grid that grows by adding only the new point's jobs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import CONFIGS, snakemake
from eigenattn.spectra.scaling import collect, length_fits, sample_saturation
from eigenattn.spectra.stores import run_full, run_rows, spectrum_table
from synthetic import VARIANTS, write_store


@pytest.mark.parametrize("alpha", [0.4, 0.75, 1.0])
def test_fit_recovers_a_planted_power_law(alpha):
    rng = np.random.default_rng(1)
    ns = [32, 64, 128, 256, 512]
    recs = []
    for layer in range(4):
        for head in range(8):
            c = rng.uniform(0.5, 2.0)  # heads differ in scale, share the exponent
            for n in ns:
                k = c * n**alpha * np.exp(rng.normal(0, 0.05))
                recs.append(
                    {
                        "model": "m",
                        "view": "all",
                        "analysis": "rows",
                        "variant": "raw",
                        "n": n,
                        "N": 96,
                        "layer": layer,
                        "head": head,
                        "k90": k,
                        "d": n,
                        "bounded_k90": False,
                    }
                )
    fits = length_fits(pd.DataFrame(recs), N=96, bootstrap=300, seed=0)
    med = fits[fits.scope == "medians"].iloc[0]
    assert abs(med.alpha - alpha) <= 0.05 and med.alpha_low <= alpha <= med.alpha_high
    heads = fits[fits.scope == "head"]
    assert len(heads) == 32 and (heads.alpha - alpha).abs().median() <= 0.05


def _rank4_blocks(N, n=12, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((4, n * n))  # the same 4 blocks at every N
    coef = rng.standard_normal((N, 4)) * np.array([4.0, 3.0, 2.0, 1.5])
    return (coef @ basis).reshape(N, 1, 1, n, n).astype(np.float32)


def test_true_rank_below_N_is_reported_unbounded_with_the_exact_rank(tmp_path):
    points = []
    for N in (16, 32):
        s = [write_store(tmp_path / f"s{N}.zarr", _rank4_blocks(N, seed=N), batch=4)]
        paths = [tmp_path / f"{x}{N}.zarr" for x in ("rows", "halves", "full")]
        run_rows(s, paths[0], "all", VARIANTS, 2, halves_path=paths[1])
        run_full(s, paths[2], "all", ["raw"], 64, rank=None, seed=0)
        spectrum_table(*paths, [1]).to_csv(tmp_path / f"sp{N}.csv", index=False)
        points.append((tmp_path / f"sp{N}.csv", 12, N))
    table = collect(points)
    sat = sample_saturation(table, n=12)
    k99 = sat[sat.level == "k99"].iloc[0]
    assert k99.k_last == 4 and k99.k_prev == 4 and not k99.bounded and k99.saturated
    # every head's full-matrix k90 is unbounded at every N, from the first N on
    full = table[(table.analysis == "full") & (table.n == 12)]
    assert sorted(set(full.N)) == [16, 32] and not full.bounded_k90.astype(bool).any()


def test_adding_a_length_schedules_only_its_jobs(tiny_run, tmp_path):
    wd, _ = tiny_run
    over = tmp_path / "more.yaml"
    s = yaml.safe_load(Path(CONFIGS[1]).read_text())["scaling"]
    over.write_text(yaml.safe_dump({"scaling": {**s, "lengths": s["lengths"] + [24]}}))
    proc = snakemake(wd, "-n", "scaling", configs=[*CONFIGS, str(over)])
    out = proc.stdout + proc.stderr
    jobs = [b for b in out.split("rule ")[1:] if b.startswith("scaling_")]
    point_jobs = [b for b in jobs if not b.startswith("scaling_table")]
    assert point_jobs and all("n=24" in b for b in point_jobs), out[-3000:]
    names = {b.split(":")[0] for b in point_jobs}
    assert names == {
        "scaling_sample_passages",
        "scaling_extract_scores",
        "scaling_eigen_rows",
        "scaling_eigen_spectrum",
    }  # a length point needs no full-matrix analysis
    assert "rule extract_scores:" not in out and "rule eigen_rows:" not in out


def test_scaling_stage_outputs(tiny_run):
    """The grid on tests/config.yaml: lengths 16 and 32 (the main run's) at N = 12, samples 12 and
    24 at n = 16; the main point is read from the main run, not stored twice."""
    wd, _ = tiny_run
    for view, d in (("all", {16: 16, 32: 32}), ("prefix", {16: 8, 32: 16})):
        table = pd.read_csv(wd / "results" / "scaling" / "minilm" / f"{view}.csv")
        rows = table[table.analysis == "rows"]
        assert set(zip(rows.n, rows.N)) == {(16, 12), (16, 24), (32, 12)}
        assert {n: int(g.d.iloc[0]) for n, g in rows.groupby("n")} == d
        full = table[table.analysis == "full"]
        assert set(zip(full.n, full.N)) >= {(16, 12), (16, 24)}
        assert len(rows[(rows.n == 16) & (rows.N == 12) & (rows.variant == "raw")]) == 6 * 12
        fits = pd.read_csv(wd / "results" / "scaling" / "minilm" / f"{view}.fits.csv")
        med = fits[fits.scope == "medians"]
        assert set(med.variant) == {"raw", "row_centered"} and (med.alpha_low <= med.alpha_high).all()
        sat = pd.read_csv(wd / "results" / "scaling" / "minilm" / f"{view}.saturation.csv")
        assert set(sat.N_last) == {24} and set(sat.level) == {"k90", "k95", "k99"}
    assert not (wd / "results" / "scaling" / "scores" / "minilm" / "n32").exists()  # the main run's
    claims = pd.read_csv(wd / "results" / "claims.csv")
    assert claims.scope.str.startswith("rows against n").any()
    assert (wd / "results" / "figures" / "scaling" / "k90_vs_n.png").is_file()
