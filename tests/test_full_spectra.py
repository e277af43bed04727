"""Full-matrix spectra (eigenattn.spectra.full_spectra): both exact routes against each other, against the
dense covariance, sklearn's PCA and the former all-heads Gram implementation (tests/oracle_full.py);
the randomised top-r route against the exact one; the memory plan; direct score reads."""

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

import oracle_full
from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError
from eigenattn.spectra.full_plan import FullPlan, choose_route, plan_full, stores_memory_mb
from eigenattn.spectra.full_spectra import full_spectra, full_spectrum
from eigenattn.spectra.stores import run_full, run_rows, spectrum_table
from eigenattn.storage.score_source import open_score_source
from eigenattn.storage.store import open_scores
from synthetic import VARIANTS, low_rank_scores, write_store

EXACT = {"rank": None, "seed": 0}  # exact spectra (eigen.full_rank: null)
KEYS = ("eigenvalues", "total_variance", "ev_heldout", "half_eigenvalues", "half_total_variance")


def assert_same(old: dict, new: dict, rtol=1e-9):
    """Equal within ``rtol`` of each array's scale. The former implementation padded each half's
    spectrum and the held-out curve to min(|a|, |b|) − 1 entries even where D is smaller; past D
    they are zeros (spectrum) or flat (curve), and the new one stores min(that, D)."""
    for k in KEYS:
        a, b = np.asarray(old[k]), np.asarray(new[k])
        if a.shape != b.shape:
            m = b.shape[-1]
            assert a.shape[:-1] == b.shape[:-1] and a.shape[-1] > m, (k, a.shape, b.shape)
            tail = a[..., m:] - (a[..., m - 1 : m] if k == "ev_heldout" else 0.0)
            assert np.abs(tail).max() <= rtol * max(np.abs(a).max(), 1e-300), k
            a = a[..., :m]
        err = np.abs(a - b).max() / max(np.abs(a).max(), 1e-300)
        assert err <= rtol, (k, err)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    out = {}
    # N = 20 (D > N for `all`, n = 16; D < N for `prefix`, n = 8) and N = 40 with D = 16 < N/2
    for name, (N, n, cut) in {"small": (20, 16, 12), "tall": (40, 8, 24)}.items():
        data = low_rank_scores(N, 2, 3, n, seed=2)
        out[name] = (
            data,
            [
                write_store(d / f"{name}-0.zarr", data[:cut], batch=4),
                write_store(d / f"{name}-1.zarr", data[cut:], batch=4),
            ],
        )
    return out


@pytest.mark.parametrize("name", ["small", "tall"])
@pytest.mark.parametrize("view", ["all", "prefix"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_routes_match_former_implementation(stores, name, view, variant):
    data, shards = stores[name]
    old = oracle_full.full_spectrum(open_scores(shards)[0], view, variant, False, 64)
    for route in ("covariance", "gram"):
        for memory_mb in (64, 1e-4):  # one task per layer; one head per task and one chunk per panel
            # direct reads, and (once) reads through a Dask array's graph
            for source in [open_score_source(shards)[0]] + ([open_scores(shards)[0]] if memory_mb == 64 else []):
                new = full_spectrum(source, view, variant, False, memory_mb, route=route, workers=2, **EXACT)
                assert_same(old, new)
                assert new["route"] == route and new["n_samples"] == old["n_samples"] and new["dim"] == old["dim"]
                assert new["split_sequence"] == old["split_sequence"]


@pytest.mark.parametrize("view", ["all", "prefix"])
def test_routes_match_dense_covariance_and_pca(stores, view):
    data, shards = stores["tall"]
    N, n = data.shape[0], data.shape[-1]
    qs, ks = view_slices(view, n, False)
    res = {
        r: full_spectrum(open_score_source(shards)[0], view, "raw", False, 64, route=r, **EXACT)
        for r in ("covariance", "gram")
    }
    split = res["gram"]["split_sequence"]
    for layer in range(data.shape[1]):
        for head in range(data.shape[2]):
            V = data[:, layer, head, qs, ks].reshape(N, -1).astype(np.float64)
            w = np.linalg.eigvalsh(np.cov(V, rowvar=False))[::-1][: min(N - 1, V.shape[1])]
            pca = PCA().fit(V[:split])
            for r in res.values():
                np.testing.assert_allclose(r["eigenvalues"][layer, head], w, rtol=1e-9, atol=1e-9 * w[0])
                np.testing.assert_allclose(
                    r["total_variance"][layer, head], np.trace(np.cov(V, rowvar=False)), rtol=1e-12
                )
                m = min(len(pca.explained_variance_), r["half_eigenvalues"].shape[-1])
                np.testing.assert_allclose(
                    r["half_eigenvalues"][0, layer, head, :m], pca.explained_variance_[:m], rtol=1e-9, atol=1e-9 * w[0]
                )


def test_all_variants_in_one_call_equal_one_at_a_time(stores):
    _, shards = stores["small"]
    both = full_spectra(open_score_source(shards)[0], "all", list(VARIANTS), False, 64, workers=2, **EXACT)
    for v in VARIANTS:
        assert_same(full_spectrum(open_score_source(shards)[0], "all", v, False, 64, **EXACT), both[v], rtol=1e-12)


def test_blas_parallel_equals_task_parallel(stores):
    _, shards = stores["tall"]
    a = full_spectrum(open_score_source(shards)[0], "all", "raw", False, 64, workers=2, parallel="tasks", **EXACT)
    b = full_spectrum(open_score_source(shards)[0], "all", "raw", False, 64, workers=2, parallel="blas", **EXACT)
    assert_same(a, b, rtol=1e-12)


def test_route_by_shape_and_bad_route():
    assert choose_route(3072, 1024) == "covariance" and choose_route(3072, 3072) == "covariance"
    assert choose_route(3072, 4096) == "gram" and choose_route(10, 10**6, "covariance") == "covariance"
    with pytest.raises(ConfigError, match="'eigen.full_route': unknown full-matrix route 'fast'"):
        choose_route(10, 10, "fast")


def test_memory_plan_is_independent_of_layers_and_heads():
    """A task holds a bounded group of heads: what it holds is the same for 2 x 4 and 12 x 12 heads,
    so peak memory does not grow with L·H; a budget too small for one head still plans one."""
    for N, D in ((3072, 1024), (3072, 4096), (10_000, 65_536)):
        plans = [plan_full(N, D, L, H, N // 2, 8, 512, 2, rank=None) for L, H in ((2, 4), (6, 12), (12, 12))]
        assert len({p.task_bytes() for p in plans if p.group < 4}) <= 1
        assert len({p.peak_mb() for p in plans[1:]}) == 1
        for p in plans:
            assert p.group >= 1 and p.group * p.state_bytes() <= max(512 * 2**20 / 2 / 2, p.state_bytes())
    tiny = plan_full(3072, 4096, 6, 12, 1536, 8, 1e-3, 2, rank=None)
    assert tiny.group == 1 and tiny.panel_rows == 8 and tiny.stream_rows == 8


def test_memory_estimate_from_real_store_layout(stores, tmp_path):
    data, shards = stores["small"]
    N, L, H, n = data.shape[:4]
    got = stores_memory_mb(shards, "all", False, 64, 2, rank=None)
    want = plan_full(N, n * n, L, H, N // 2, 4, 64, 2, rank=None).peak_mb()
    assert got == want
    # before the store exists: a generous guess, never smaller than what the real store needs
    guess = stores_memory_mb(
        [tmp_path / "missing.zarr"],
        "all",
        False,
        64,
        2,
        guess_n_sequences=4 * N,
        guess_seq_len=n,
        guess_heads=32,
        rank=None,
    )
    assert guess >= got


def test_randomized_top_r_agrees_with_exact_and_bounds_beyond_r(tmp_path):
    """Top-r spectra by randomised SVD: the leading eigenvalues, the exact total and the held-out
    curve agree with the exact route on low-rank data; a k_p beyond r is flagged as bounded."""
    rng = np.random.default_rng(3)
    Nf, nn = 48, 8
    basis = rng.standard_normal((4, nn * nn))
    coef = rng.standard_normal((Nf, 4)) * np.array([5.0, 3.0, 2.0, 1.5])
    low = (coef @ basis).reshape(Nf, 1, 1, nn, nn) + 0.01 * rng.standard_normal((Nf, 1, 1, nn, nn))
    low = low.astype(np.float32)
    s = [write_store(tmp_path / "low.zarr", low, batch=4)]
    exact = full_spectrum(open_score_source(s)[0], "all", "raw", False, 64, **EXACT)
    top = full_spectrum(open_score_source(s)[0], "all", "raw", False, 64, rank=8, seed=1)
    assert top["route"] == "randomized" and top["rank"] == 8 and top["eigenvalues"].shape[-1] == 8
    np.testing.assert_allclose(top["eigenvalues"][..., :4], exact["eigenvalues"][..., :4], rtol=1e-6)
    np.testing.assert_allclose(top["total_variance"], exact["total_variance"], rtol=1e-12)
    np.testing.assert_allclose(top["ev_heldout"][..., :4], exact["ev_heldout"][..., :4], rtol=1e-6)
    np.testing.assert_allclose(top["half_total_variance"], exact["half_total_variance"], rtol=1e-12)
    again = full_spectrum(open_score_source(s)[0], "all", "raw", False, 64, rank=8, seed=1)
    np.testing.assert_array_equal(again["eigenvalues"], top["eigenvalues"])  # deterministic for a seed
    iso = rng.standard_normal((Nf, 1, 1, nn, nn)).astype(np.float32)
    for name, data, rank, want_bounded in (("low", low, 8, False), ("iso", iso, 3, True)):
        si = [write_store(tmp_path / f"{name}.zarr", data, batch=4)]
        run_rows(si, tmp_path / f"{name}-rows.zarr", "all", ["raw"], 2, halves_path=tmp_path / f"{name}-halves.zarr")
        run_full(si, tmp_path / f"{name}-full.zarr", "all", ["raw"], 64, rank=rank, seed=0)
        df = spectrum_table(
            tmp_path / f"{name}-rows.zarr", tmp_path / f"{name}-halves.zarr", tmp_path / f"{name}-full.zarr", [1]
        )
        f = df[df.analysis == "full"].iloc[0]
        assert [f.bounded_k90, f.bounded_k95, f.bounded_k99] == [want_bounded] * 3, f
        if want_bounded:  # isotropic: N - 1 = 47 < D = 64, and 3 components explain far less than 90%
            assert f.k90 == 3 and pd.isna(f.k90_cv)
        else:
            assert f.k90 <= 4


def test_score_source_reads_like_the_dask_array(stores):
    data, shards = stores["small"]
    src, attrs = open_score_source(shards)
    dask_arr, _ = open_scores(shards)
    assert src.shape == dask_arr.shape and src.seq_chunks == dask_arr.chunks[0]
    for s0, s1 in ((0, 20), (3, 15), (11, 13), (12, 20)):  # across the shard boundary at 12
        np.testing.assert_array_equal(src.read(s0, s1, 1, slice(0, 2)), data[s0:s1, 1, 0:2])
    sub = src[:, [1]]
    assert sub.shape[1] == 1
    np.testing.assert_array_equal(sub.read(0, 5, 0, slice(None)), data[0:5, 1])
    with pytest.raises(TypeError, match="selects layers only"):
        src[0:3]


def test_too_few_sequences_per_half(tmp_path):
    data = low_rank_scores(3, 1, 1, 4)
    s = [write_store(tmp_path / "a.zarr", data, batch=1)]
    with pytest.raises(Exception, match="at least 2 sequences per half"):
        full_spectrum(open_score_source(s)[0], "all", "raw", False, 64, **EXACT)


def test_plan_components():
    p = FullPlan("covariance", 3072, 1024, 6, 12, 1536, 8, 8, 2048, 0, 2)
    assert p.r == 1024 and p.r_half == 1024
    g = FullPlan("gram", 3072, 4096, 6, 12, 1536, 8, 1, 2944, 2944, 2)
    assert g.r == 3071 and g.r_half == 1535
    t = FullPlan("randomized", 3072, 4096, 6, 12, 1536, 8, 1, 8, 8, 2, rank=64)
    assert t.r == 64 and t.r_half == 64
