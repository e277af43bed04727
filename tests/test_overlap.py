"""Subspace overlap against scipy's principal angles, with its invariants and error cases."""

import numpy as np
import pytest
import scipy.linalg
import yaml
import zarr

from conftest import REPO
from eigenattn.config.validation import check, validate
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.overlap import (
    check_ks,
    cross_model,
    overlap_and_captured,
    scope_masks,
    summarise,
    within_model,
    write_overlap,
)
from eigenattn.spectra.rows import explained_variance
from eigenattn.spectra.stores import run_rows
from synthetic import VARIANTS, low_rank_scores, write_store


def _orthonormal(rng, m, d):
    return np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(m)])


def test_overlap_is_mean_cos2_of_principal_angles():
    rng = np.random.default_rng(0)
    U = _orthonormal(rng, 5, 12)
    lam = np.sort(rng.random((5, 12)), axis=-1)[:, ::-1]
    ks = [1, 3, 6]
    ov, _ = overlap_and_captured(U, U, lam, ks, block=2)
    for ki, k in enumerate(ks):
        for a in range(5):
            for b in range(5):
                angles = scipy.linalg.subspace_angles(U[a, :, :k], U[b, :, :k])
                assert abs(ov[ki, a, b] - np.mean(np.cos(angles) ** 2)) <= 1e-10
        assert np.allclose(np.diag(ov[ki]), 1.0, atol=1e-12)
        assert np.allclose(ov[ki], ov[ki].T, atol=1e-12)
        assert (ov[ki] >= 0).all() and (ov[ki] <= 1).all()


def test_random_subspaces_average_k_over_d():
    rng = np.random.default_rng(1)
    d, k, m = 40, 5, 60
    U = _orthonormal(rng, m, d)
    ov, _ = overlap_and_captured(U, U, np.ones((m, d)), [k])
    off = ov[0][~np.eye(m, dtype=bool)]
    # E = k/d; sd of one value ~ sqrt(2 k (d-k)^2 / (d^2 (d+2) k^2)) ~ 0.05 here; mean of 3540 pairs
    assert abs(off.mean() - k / d) < 0.01


def test_captured_self_equals_explained_variance():
    rng = np.random.default_rng(2)
    U = _orthonormal(rng, 3, 10)
    lam = np.sort(rng.random((3, 10)) ** 3, axis=-1)[:, ::-1]
    ks = [1, 4, 10]
    _, cap = overlap_and_captured(U, U, lam, ks)
    ev = explained_variance(lam)
    for ki, k in enumerate(ks):
        np.testing.assert_allclose(np.diag(cap[ki]), ev[:, k - 1], atol=1e-12)


def test_scopes():
    m = scope_masks(3, 2)
    assert m["same_layer_other_heads"].sum() == 3 and m["adjacent_layers"].sum() == 8
    assert m["all_layer_pairs"].sum() == 12  # 15 pairs - 3 same-layer


@pytest.fixture(scope="module")
def analyses(tmp_path_factory):
    d = tmp_path_factory.mktemp("ov")
    out = {}
    for name, seed, L, H in (("m1", 0, 3, 2), ("m2", 1, 2, 3)):
        s = write_store(d / f"{name}.zarr", low_rank_scores(16, L, H, 12, seed=seed), batch=4, model=name)
        run_rows([s], d / f"{name}-rows.zarr", "prefix", VARIANTS, 2, halves_path=d / f"{name}-halves.zarr")
        out[name] = (d / f"{name}-rows.zarr", d / f"{name}-halves.zarr")
    return d, out


def test_within_and_cross_stores_and_summary(analyses):
    d, out = analyses
    arrays, attrs = within_model(*out["m1"], "raw", [2, 4])
    assert arrays["overlap"].shape == (2, 6, 6) and arrays["captured"].shape == (2, 6, 6)
    assert arrays["half_overlap"].shape == (2, 6, 6) and arrays["half_captured"].shape == (2, 6, 6)
    assert arrays["split_half"].shape == (2, 6) and arrays["pooled"]["overlap"].shape == (2, 3, 3)
    np.testing.assert_allclose(arrays["random_baseline"], [2 / 6, 4 / 6])
    np.testing.assert_allclose(within_model(*out["m1"], "row_centered", [2, 4])[0]["random_baseline"], [2 / 5, 4 / 5])
    rows = zarr.open_group(str(out["m1"][0]), mode="r")
    ev = explained_variance(rows["raw/eigenvalues"][:]).reshape(6, -1)
    np.testing.assert_allclose(np.diag(arrays["captured"][1]), ev[:, 3], atol=1e-12)
    # half-sample pairs against an independent computation from the halves' eigenvectors
    halves = zarr.open_group(str(out["m1"][1]), mode="r")
    Ua = halves["raw/a/eigenvectors"][:].reshape(6, 6, 6)
    Ub = halves["raw/b/eigenvectors"][:].reshape(6, 6, 6)
    for i, j in [(0, 0), (1, 4), (5, 2)]:
        angles_ab = scipy.linalg.subspace_angles(Ua[i][:, :2], Ub[j][:, :2])
        angles_ba = scipy.linalg.subspace_angles(Ub[i][:, :2], Ua[j][:, :2])
        want = 0.5 * (np.mean(np.cos(angles_ab) ** 2) + np.mean(np.cos(angles_ba) ** 2))
        assert abs(arrays["half_overlap"][0, i, j] - want) <= 1e-10
    np.testing.assert_allclose(arrays["split_half"], np.diagonal(arrays["half_overlap"], axis1=1, axis2=2))
    write_overlap(d / "w1.zarr", arrays, attrs)
    write_overlap(d / "w2.zarr", *within_model(*out["m2"], "raw", [2, 4]))
    carr, cattrs = cross_model(*out["m1"], *out["m2"], "raw", [2, 4])
    assert carr["overlap"].shape == (2, 6, 6) and carr["pooled"]["captured"].shape == (2, 3, 2)
    write_overlap(d / "c.zarr", carr, cattrs)
    df = summarise([d / "w1.zarr", d / "w2.zarr"], [d / "c.zarr"])
    assert set(df.scope) == {
        "same_layer_other_heads",
        "adjacent_layers",
        "all_layer_pairs",
        "split_half",
        "cross_model",
    }
    assert set(df.quantity) == {"overlap", "captured"}
    x = df[(df.model_a == "m1") & (df.quantity == "overlap") & (df.scope == "all_layer_pairs") & (df.k == 2)].iloc[0]
    upper = np.triu(np.ones((6, 6), bool), 1) & (np.repeat(np.arange(3), 2)[:, None] != np.repeat(np.arange(3), 2))
    assert x.n_pairs == upper.sum() and x["median"] == pytest.approx(np.median(arrays["overlap"][0][upper]))
    ceil = np.sqrt(np.outer(arrays["split_half"][0], arrays["split_half"][0]))
    assert x.median_ratio_ceiling == pytest.approx(np.median(arrays["half_overlap"][0][upper] / ceil[upper]))
    c = df[(df.quantity == "captured") & (df.scope == "same_layer_other_heads") & (df.model_a == "m1")]
    assert (c.n_pairs == 6).all()  # ordered pairs: 3 layers x 2 heads x 1 other head
    assert ((df["p10"] <= df["median"]) & (df["median"] <= df["p90"])).all()


def _independent_subspace_analyses(root, same: bool):
    """Heads with a well-defined rank-3 subspace each: independent random ones, or one shared one."""
    rng = np.random.default_rng(7)
    N, L, H, n = 24, 3, 4, 24
    shared = np.linalg.qr(rng.standard_normal((n // 2, 3)))[0]
    data = np.empty((N, L, H, n, n), np.float32)
    for l in range(L):
        for h in range(H):
            B = shared if same else np.linalg.qr(rng.standard_normal((n // 2, 3)))[0]
            coef = rng.standard_normal((N, n, 3)) * np.array([3.0, 2.0, 1.5])
            data[:, l, h, :, : n // 2] = coef @ B.T + 0.05 * rng.standard_normal((N, n, n // 2))
            data[:, l, h, :, n // 2 :] = rng.standard_normal((N, n, n // 2))
    s = write_store(root / "ind.zarr", data, batch=4)
    run_rows([s], root / "rows.zarr", "prefix", VARIANTS, 2, halves_path=root / "halves.zarr")
    write_overlap(root / "w.zarr", *within_model(root / "rows.zarr", root / "halves.zarr", "raw", [3]))
    return summarise([root / "w.zarr"], [])


@pytest.mark.parametrize("same", [False, True])
def test_independent_subspaces_read_as_random(tmp_path, same):
    """Where C2 is false (every head its own random subspace) the overlap sits at the random
    baseline, while each head's split-half ceiling is high; where it holds, both are high."""
    df = _independent_subspace_analyses(tmp_path, same)
    ov = df[(df.quantity == "overlap") & (df.scope == "all_layer_pairs")].iloc[0]
    sh = df[(df.quantity == "overlap") & (df.scope == "split_half")].iloc[0]
    assert sh.median_ratio_random > 3
    if same:
        assert ov.median_ratio_random > 3 and ov.median_ratio_ceiling > 0.9
    else:
        assert ov.median_ratio_random < 1.5 and ov.median_ratio_ceiling < 0.3


def test_bad_inputs(analyses, tmp_path):
    d, out = analyses
    with pytest.raises(ConfigError, match=r"'overlap.k': k = \[8\] outside 1..d = 6"):
        within_model(*out["m1"], "raw", [8])
    with pytest.raises(ConfigError, match=r"'overlap.k': k = \[0\] outside 1..d = 6"):
        check_ks([0], 6)
    other = write_store(tmp_path / "o.zarr", low_rank_scores(8, 1, 1, 16), batch=4, model="o")
    run_rows([other], tmp_path / "o-rows.zarr", "prefix", VARIANTS, 2, halves_path=tmp_path / "o-halves.zarr")
    with pytest.raises(InputError, match="different row dimensions"):
        cross_model(*out["m1"], tmp_path / "o-rows.zarr", tmp_path / "o-halves.zarr", "raw", [2])


def _config(**overlap):
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["overlap"].update(overlap)
    validate(c)
    return c


def test_config_checks():
    with pytest.raises(ConfigError, match=r"overlap.cross_pairs\[0\]\[1\]': unknown model 'bert'"):
        check(_config(cross_pairs=[["minilm", "bert"]]))
    with pytest.raises(ConfigError, match="overlap.k': k = \\[128\\] exceeds the d = 64 keys of view 'prefix'"):
        check(_config(k=[4, 128]))
    check(_config())
