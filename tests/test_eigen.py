"""Eigen analysis against numpy, scipy, sklearn and dask's randomised SVD."""

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.full_spectra import full_spectrum
from eigenattn.spectra.moments import merge_packed, pack, sample_moments, unpack
from eigenattn.spectra.rows import eigh_desc, explained_variance, k_at, row_spectrum
from eigenattn.spectra.scheduler import dask_scheduler
from eigenattn.spectra.stores import run_full, run_rows, spectrum_table
from eigenattn.storage.store import open_scores
from synthetic import VARIANTS, low_rank_scores, write_store

N, L, H, n = 20, 2, 3, 16


@pytest.fixture(scope="module")
def data():
    return low_rank_scores(N, L, H, n, seed=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("shards")
    return [write_store(d / "shard-0.zarr", data[:12]), write_store(d / "shard-1.zarr", data[12:])]


def _rows(data, view, variant, causal=False):
    qs, ks = view_slices(view, n, causal)
    x = data[..., qs, ks].astype(np.float64)
    if variant == "row_centered":
        x = x - x.mean(-1, keepdims=True)
    return x  # (N, L, H, q, d)


@pytest.mark.parametrize("view", ["all", "prefix"])
@pytest.mark.parametrize("variant", ["raw", "row_centered"])
def test_rows_match_numpy(shards, data, view, variant):
    scores, _ = open_scores(shards)
    res = row_spectrum(scores, view, variant, causal=False, split_every=2)
    x = _rows(data, view, variant)
    d = x.shape[-1]
    for l in range(L):
        for h in range(H):
            X = x[:, l, h].reshape(-1, d)
            w, v = np.linalg.eigh(np.cov(X, rowvar=False))
            w, v = w[::-1], v[:, ::-1]
            got = res["heads"]
            np.testing.assert_allclose(got["mean"][l, h], X.mean(0), rtol=0, atol=1e-12)
            assert np.abs(got["eigenvalues"][l, h] - w).max() / w[0] <= 1e-9
            assert got["count"][l, h] == X.shape[0]
            gaps = w[:-1] - w[1:]
            for k in (1, 2, 3):
                if gaps[k - 1] > 1e-6 * w[0]:  # the top-k subspace is well defined
                    U, V = got["eigenvectors"][l, h][:, :k], v[:, :k]
                    assert np.linalg.norm(U.T @ V) ** 2 / k >= 1 - 1e-9
        Xp = x[:, l].reshape(-1, d)  # pooled over heads
        wp = np.linalg.eigvalsh(np.cov(Xp, rowvar=False))[::-1]
        assert np.abs(res["pooled"]["eigenvalues"][l] - wp).max() / wp[0] <= 1e-9


def test_explained_variance_matches_sklearn_pca(shards, data):
    scores, _ = open_scores(shards)
    res = row_spectrum(scores, "all", "raw", causal=False, split_every=8)
    X = _rows(data, "all", "raw")[:, 1, 2].reshape(-1, n)
    pca = PCA().fit(X)
    ev = explained_variance(res["heads"]["eigenvalues"][1, 2])
    np.testing.assert_allclose(ev, np.cumsum(pca.explained_variance_ratio_), rtol=0, atol=1e-10)
    np.testing.assert_allclose(res["heads"]["eigenvalues"][1, 2], pca.explained_variance_, rtol=1e-9, atol=1e-12)


def test_chan_merge_is_exact():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((m, 5)) * 3 + 7 for m in (3, 10, 1, 6)]
    merged = merge_packed(np.stack([pack(*sample_moments(p)) for p in parts]), axis=0, keepdims=False)
    count, mean, m2 = unpack(merged)
    X = np.concatenate(parts)
    assert count == len(X)
    np.testing.assert_allclose(mean, X.mean(0), atol=1e-13)
    np.testing.assert_allclose(m2, (X - X.mean(0)).T @ (X - X.mean(0)), rtol=1e-12, atol=1e-11)


def test_chunking_invariance(tmp_path, data):
    a = [write_store(tmp_path / "a.zarr", data, batch=3)]
    b = [write_store(tmp_path / "b0.zarr", data[:7], batch=7), write_store(tmp_path / "b1.zarr", data[7:], batch=5)]
    ra = row_spectrum(open_scores(a)[0], "prefix", "raw", False, split_every=2)
    rb = row_spectrum(open_scores(b)[0], "prefix", "raw", False, split_every=5)
    for key in ("mean", "eigenvalues"):
        np.testing.assert_allclose(ra["heads"][key], rb["heads"][key], rtol=1e-10, atol=1e-10)
    fa = full_spectrum(open_scores(a)[0], "all", "raw", False, 64, rank=None, seed=0)
    fb = full_spectrum(open_scores(b)[0], "all", "raw", False, 0.001, rank=None, seed=0)
    np.testing.assert_allclose(fa["eigenvalues"], fb["eigenvalues"], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fa["total_variance"], fb["total_variance"], rtol=1e-10)


@pytest.mark.parametrize("view", ["all", "prefix"])
def test_full_gram_matches_dense_covariance_and_svd_compressed(shards, data, view):
    import dask.array as da

    scores, _ = open_scores(shards)
    res = full_spectrum(scores, view, "raw", causal=False, memory_mb=64, rank=None, seed=0)
    qs, ks = view_slices(view, n, False)
    for l in range(L):
        for h in range(H):
            V = data[:, l, h, qs, ks].reshape(N, -1).astype(np.float64)
            C = np.cov(V, rowvar=False)  # dense D x D covariance: fine at this size
            w = np.linalg.eigvalsh(C)[::-1][: N - 1]
            np.testing.assert_allclose(res["eigenvalues"][l, h], w, rtol=1e-9, atol=1e-9 * w[0])
            np.testing.assert_allclose(res["total_variance"][l, h], np.trace(C), rtol=1e-12)
            Vc = da.from_array(V - V.mean(0), chunks=(5, -1))
            k = 4
            _, s, _ = da.linalg.svd_compressed(Vc, k, n_power_iter=6, seed=0)
            np.testing.assert_allclose(s.compute() ** 2 / (N - 1), res["eigenvalues"][l, h, :k], rtol=1e-6)


def test_distributed_equals_threads(shards):
    with dask_scheduler("threads", 2):
        a = row_spectrum(open_scores(shards)[0], "all", "row_centered", False, 8)
    with dask_scheduler("distributed", 1):
        b = row_spectrum(open_scores(shards)[0], "all", "row_centered", False, 8)
    np.testing.assert_allclose(a["heads"]["eigenvalues"], b["heads"]["eigenvalues"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a["pooled"]["mean"], b["pooled"]["mean"], rtol=1e-12, atol=1e-12)


def test_k_at_and_eigh_desc():
    ev = np.array([0.5, 0.89, 0.9, 0.99, 1.0])
    assert k_at(ev, 0.9) == 3 and k_at(ev, 0.95) == 4 and k_at(ev, 0.99) == 4
    w, v = eigh_desc(np.diag([1.0, 3.0, 2.0]))
    np.testing.assert_allclose(w, [3, 2, 1])
    assert (v.max(axis=0) == 1).all()  # sign fixed: largest component positive


def test_stores_and_spectrum_csv(tmp_path, shards, data):
    run_rows(shards, tmp_path / "rows.zarr", "all", VARIANTS, 2, halves_path=tmp_path / "halves.zarr")
    run_full(shards, tmp_path / "full.zarr", "all", VARIANTS, 64, rank=None, seed=0)
    df = spectrum_table(tmp_path / "rows.zarr", tmp_path / "halves.zarr", tmp_path / "full.zarr", [1, 2, 4])
    cols = [
        "model",
        "view",
        "analysis",
        "variant",
        "layer",
        "head",
        "d",
        "n_samples",
        "total_variance",
        "k90",
        "k90_cv",
        "k95",
        "k95_cv",
        "k99",
        "k99_cv",
        "ev_at_1",
        "ev_at_2",
        "ev_at_4",
        "bounded_k90",
        "bounded_k95",
        "bounded_k99",
        "k90_split_spread",
        "k95_split_spread",
        "k99_split_spread",
        "u1_constant",
    ]
    assert list(df.columns) == cols
    # rows: L*H heads + L pooled, per variant; full: L*H per variant
    assert len(df) == 2 * (L * H + L) + 2 * L * H
    r = df[(df.analysis == "rows") & (df.variant == "raw") & (df["head"] != "pooled")]
    assert (r.n_samples == N * n).all() and not r[["bounded_k90", "bounded_k95", "bounded_k99"]].any().any()
    f = df[(df.analysis == "full") & (df.variant == "raw")]
    assert (f.n_samples == N).all() and (f.d == n * n).all()
    # rank-3 structure: k90 of the full view stays far below N-1
    pca = PCA().fit(data[:, 0, 0].reshape(N, -1).astype(np.float64))
    k90 = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), 0.9 - 1e-12) + 1)
    assert f[(f.layer == 0) & (f["head"] == 0)].k90.iloc[0] == k90
    import zarr

    g = zarr.open_group(str(tmp_path / "rows.zarr"), mode="r")
    assert g["raw/eigenvectors"].shape == (L, H, n, n) and g["raw/pooled/eigenvalues"].shape == (L, n)
    assert g["row_centered/count"].shape == (L, H)
    f = zarr.open_group(str(tmp_path / "full.zarr"), mode="r")
    assert f["eigenvalues"].shape == (L, H, N - 1) and f.attrs["n_samples"] == N


def test_bad_inputs(tmp_path, data):
    with pytest.raises(InputError, match=r"input '\[\]': no score shards"):
        run_rows([], tmp_path / "r.zarr", "all", VARIANTS, 2)
    causal = [write_store(tmp_path / "c.zarr", data, causal=True)]
    with pytest.raises(ConfigError, match="'eigen.views': view 'all' is undefined for a causal model"):
        run_rows(causal, tmp_path / "r.zarr", "all", VARIANTS, 2)
    with pytest.raises(ConfigError, match="'eigen.variants': unknown variant 'centred'"):
        run_full(causal, tmp_path / "f.zarr", "prefix", ["centred"], 64, rank=None, seed=0)
    assert not (tmp_path / "r.zarr").exists() and not (tmp_path / "f.zarr").exists()


def _half_pca_share(Xa, Xb, k):
    """Brute force: share of Xb's variance (about its own mean) inside Xa's top-k principal axes."""
    _, _, vt = np.linalg.svd(Xa - Xa.mean(0), full_matrices=False)
    Pb = (Xb - Xb.mean(0)) @ vt[:k].T
    return (Pb**2).sum() / ((Xb - Xb.mean(0)) ** 2).sum()


@pytest.mark.parametrize("route", ["covariance", "gram"])
def test_heldout_explained_variance_matches_brute_force(tmp_path, route):
    rng = np.random.default_rng(4)
    N, nn, split = 14, 6, 6  # D = 36 > N: half a has 6 sequences, b 8
    X = rng.standard_normal((N, 5)) @ rng.standard_normal((5, nn * nn)) * 3 + rng.standard_normal((N, nn * nn)) + 7
    s = [
        write_store(tmp_path / "a.zarr", X.reshape(N, 1, 1, nn, nn).astype(np.float32)[:split], batch=split),
        write_store(tmp_path / "b.zarr", X.reshape(N, 1, 1, nn, nn).astype(np.float32)[split:], batch=N - split),
    ]
    X = X.astype(np.float32).astype(np.float64)
    res = full_spectrum(open_scores(s)[0], "all", "raw", False, 64, route=route, rank=None, seed=0)
    assert res["split_sequence"] == split
    ev = res["ev_heldout"][0, 0]
    assert ev.shape == (min(split, N - split) - 1,)
    for k in range(1, len(ev) + 1):
        want = 0.5 * (_half_pca_share(X[:split], X[split:], k) + _half_pca_share(X[split:], X[:split], k))
        assert abs(ev[k - 1] - want) <= 1e-9


def test_heldout_ev_rows_matches_covariances():
    from eigenattn.spectra.rows import heldout_ev_rows

    rng = np.random.default_rng(5)
    d = 7
    Xa = rng.standard_normal((50, d)) @ np.diag(np.arange(d, 0, -1.0))
    Xb = rng.standard_normal((60, d)) @ np.diag(np.arange(d, 0, -1.0))
    wa, Ua = eigh_desc(np.cov(Xa.T))
    wb, Ub = eigh_desc(np.cov(Xb.T))
    ev = heldout_ev_rows(Ua, wa, Ub, wb)
    Ca, Cb = np.cov(Xa.T), np.cov(Xb.T)
    for k in range(1, d + 1):
        want = 0.5 * (
            np.trace(Ua[:, :k].T @ Cb @ Ua[:, :k]) / np.trace(Cb)
            + np.trace(Ub[:, :k].T @ Ca @ Ub[:, :k]) / np.trace(Ca)
        )
        assert abs(ev[k - 1] - want) <= 1e-12
    assert abs(ev[-1] - 1.0) <= 1e-12


def test_bounded_per_level_low_rank_vs_isotropic(tmp_path):
    """A true rank below N/2 is measured (not bounded, k90 = rank); isotropic blocks in D >> N
    dimensions are bounded at every level, since N - 1 samples cannot resolve their k_p."""
    rng = np.random.default_rng(6)
    Nf, nn = 40, 16
    # rank 4 per head: every sequence's whole block is a combination of 4 fixed blocks
    basis = rng.standard_normal((4, nn * nn))
    coef = rng.standard_normal((Nf, 4)) * np.array([4.0, 3.0, 2.0, 1.5])
    low = (coef @ basis).reshape(Nf, 1, 1, nn, nn).astype(np.float32)
    iso = rng.standard_normal((Nf, 1, 1, nn, nn)).astype(np.float32)
    for name, data, want_bounded in (("low", low, False), ("iso", iso, True)):
        s = [write_store(tmp_path / f"{name}.zarr", data, batch=5)]
        run_rows(s, tmp_path / f"{name}-rows.zarr", "all", VARIANTS, 2, halves_path=tmp_path / f"{name}-halves.zarr")
        run_full(s, tmp_path / f"{name}-full.zarr", "all", VARIANTS, 64, rank=None, seed=0)
        df = spectrum_table(
            tmp_path / f"{name}-rows.zarr", tmp_path / f"{name}-halves.zarr", tmp_path / f"{name}-full.zarr", [1]
        )
        f = df[(df.analysis == "full") & (df.variant == "raw")].iloc[0]
        assert [f.bounded_k90, f.bounded_k95, f.bounded_k99] == [want_bounded] * 3, f
        if not want_bounded:
            assert f.k99 <= 4 and f.k99_cv <= 4
            ev = np.cumsum(PCA().fit(low.reshape(Nf, -1).astype(np.float64)).explained_variance_ratio_)
            assert f.k90 == int(np.searchsorted(ev, 0.9 - 1e-12) + 1)
        else:
            assert f.k90 > (Nf - 1) / 2 and pd.isna(f.k90_cv)


def test_vector_dtype_auto_and_explicit(tmp_path, shards):
    """eigen.vector_dtype: auto keeps float64 up to d = 512 and float32 above; an explicit choice
    is kept; readers get float64 and the same spectra either way (within float32 rounding)."""
    from eigenattn.spectra.overlap import within_model
    from eigenattn.spectra.stores import RowStats, vector_dtype
    from eigenattn.storage.store import open_store

    assert vector_dtype("auto", 512) == np.float64 and vector_dtype("auto", 513) == np.float32
    assert vector_dtype("float64", 4096) == np.float64 and vector_dtype("float32", 8) == np.float32
    with pytest.raises(ConfigError, match="vector_dtype"):
        vector_dtype("float16", 8)
    paths = {}
    for choice in ("float64", "float32"):
        r, h = tmp_path / f"{choice}-rows.zarr", tmp_path / f"{choice}-halves.zarr"
        run_rows(shards, r, "all", VARIANTS, 2, halves_path=h, vectors=choice)
        for store in (open_store(r), open_store(h)):
            assert store.attrs["vector_dtype"] == choice
        assert open_store(r)["raw/eigenvectors"].dtype == np.dtype(choice)
        assert open_store(h)["raw/a/pooled/eigenvectors"].dtype == np.dtype(choice)
        assert open_store(r)["raw/eigenvalues"].dtype == np.float64  # eigenvalues and means stay float64
        paths[choice] = (r, h)
    s64, s32 = RowStats(paths["float64"][0]), RowStats(paths["float32"][0])
    assert s32.eigenvectors.dtype == np.float64
    np.testing.assert_allclose(s32.eigenvectors, s64.eigenvectors, atol=1e-6)
    t64 = spectrum_table(*paths["float64"], None, [1, 2, 4])
    t32 = spectrum_table(*paths["float32"], None, [1, 2, 4])
    pd.testing.assert_frame_equal(t64, t32, check_exact=False, rtol=1e-5)
    (o64, _), (o32, _) = within_model(*paths["float64"], "raw", [1, 2]), within_model(*paths["float32"], "raw", [1, 2])

    def flat(arrays, prefix=""):
        for key, value in arrays.items():
            yield from flat(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]

    b32 = dict(flat(o32))
    for key, value in flat(o64):
        np.testing.assert_allclose(np.asarray(b32[key], float), np.asarray(value, float), rtol=1e-5, atol=1e-6)
