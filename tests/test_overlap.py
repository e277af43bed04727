"""Subspace overlap against scipy's principal angles, with its invariants and error cases."""

import numpy as np
import pytest
import scipy.linalg
import yaml
import zarr

from conftest import REPO
from eigenattn.config import check_overlap, validate_schema
from eigenattn.eigen import explained_variance, run_rows
from eigenattn.errors import ConfigError
from eigenattn.overlap import (check_ks, cross_model, overlap_and_captured, paired_overlap, scope_masks, summarise,
                               within_model, write_overlap)
from synthetic import low_rank_scores, write_store


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


def test_paired_overlap_matches_all_pairs_diagonal():
    rng = np.random.default_rng(3)
    A, B = _orthonormal(rng, 4, 9), _orthonormal(rng, 4, 9)
    ov, _ = overlap_and_captured(A, B, np.ones((4, 9)), [2, 5])
    np.testing.assert_allclose(paired_overlap(A, B, [2, 5]), np.diagonal(ov, axis1=1, axis2=2), atol=1e-12)


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
        run_rows([s], d / f"{name}-rows.zarr", "prefix", halves_path=d / f"{name}-halves.zarr")
        out[name] = (d / f"{name}-rows.zarr", d / f"{name}-halves.zarr")
    return d, out


def test_within_and_cross_stores_and_summary(analyses):
    d, out = analyses
    arrays, attrs = within_model(*out["m1"], "raw", [2, 4])
    assert arrays["overlap"].shape == (2, 6, 6) and arrays["captured"].shape == (2, 6, 6)
    assert arrays["split_half"].shape == (2, 6) and arrays["pooled"]["overlap"].shape == (2, 3, 3)
    np.testing.assert_allclose(arrays["random_baseline"], [2 / 6, 4 / 6])
    rows = zarr.open_group(str(out["m1"][0]), mode="r")
    ev = explained_variance(rows["raw/eigenvalues"][:]).reshape(6, -1)
    np.testing.assert_allclose(np.diag(arrays["captured"][1]), ev[:, 3], atol=1e-12)
    write_overlap(d / "w1.zarr", arrays, attrs)
    write_overlap(d / "w2.zarr", *within_model(*out["m2"], "raw", [2, 4]))
    carr, cattrs = cross_model(out["m1"][0], out["m2"][0], "raw", [2, 4])
    assert carr["overlap"].shape == (2, 6, 6) and carr["pooled"]["captured"].shape == (2, 3, 2)
    write_overlap(d / "c.zarr", carr, cattrs)
    df = summarise([d / "w1.zarr", d / "w2.zarr"], [d / "c.zarr"])
    assert set(df.scope) == {"same_layer_other_heads", "adjacent_layers", "all_layer_pairs", "split_half",
                             "cross_model"}
    sh = df[df.scope == "split_half"]
    assert np.allclose(sh.median_ratio_split_half, 1.0)
    assert ((df["p10"] <= df["median"]) & (df["median"] <= df["p90"])).all()


def test_bad_inputs(analyses, tmp_path):
    d, out = analyses
    with pytest.raises(ConfigError, match="overlap.k.*outside 1..d = 6"):
        within_model(*out["m1"], "raw", [8])
    with pytest.raises(ConfigError, match="overlap.k"):
        check_ks([0], 6)
    other = write_store(tmp_path / "o.zarr", low_rank_scores(8, 1, 1, 16), batch=4, model="o")
    run_rows([other], tmp_path / "o-rows.zarr", "prefix")
    with pytest.raises(ConfigError, match="different row dimensions"):
        cross_model(out["m1"][0], tmp_path / "o-rows.zarr", "raw", [2])


def _config(**overlap):
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["overlap"].update(overlap)
    validate_schema(c)
    return c


def test_config_checks():
    with pytest.raises(ConfigError, match=r"overlap.cross_pairs\[0\]\[1\]': unknown model 'bert'"):
        check_overlap(_config(cross_pairs=[["minilm", "bert"]]))
    with pytest.raises(ConfigError, match="overlap.k': k = \\[128\\] exceeds the row dimension d = 64"):
        check_overlap(_config(k=[4, 128]))
    check_overlap(_config())
