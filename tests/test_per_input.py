"""The per-input spectrum of attention probabilities (docs/method.md §12) against brute force: numpy's
softmax and SVD of every input's view block, the whole row's mask and sinks, and its claims row."""

import numpy as np
import pytest
import zarr

from eigenattn.claims.spectra import c1_per_input_rows
from eigenattn.claims.verdicts import make_row
from eigenattn.config.views import view_slices
from eigenattn.figures import head_grid, layer_curves
from eigenattn.spectra.per_input import (
    CURVE_COLUMNS,
    SUMMARY_COLUMNS,
    normalised_cumulative,
    per_input_spectrum,
    per_input_tables,
    quarter_index,
)
from synthetic import low_rank_scores, write_store


def brute_force(scores, view, causal, sinks=None):
    """Per input, layer and head: numpy softmax of the whole (masked) row, the view block, its
    singular values by numpy.linalg.svd, and Linformer's curve and the σ² curve (N, L, H, r)."""
    N, L, H, n, _ = scores.shape
    qs, ks = view_slices(view, n, causal)
    cum = np.zeros((N, L, H, ks.stop - ks.start))
    energy = np.zeros_like(cum)
    for s in range(N):
        for li in range(L):
            for h in range(H):
                S = scores[s, li, h].astype(np.float64)
                if causal:
                    S = np.where(np.tril(np.ones((n, n), dtype=bool)), S, -np.inf)
                cols = [S]
                if sinks is not None:
                    cols.append(np.full((n, 1), sinks[li, h]))
                full = np.concatenate(cols, axis=1)
                e = np.exp(full - full.max(axis=1, keepdims=True))
                P = (e / e.sum(axis=1, keepdims=True))[:, :n]
                sv = np.linalg.svd(P[qs, ks], compute_uv=False)
                cum[s, li, h] = np.cumsum(sv) / sv.sum()
                energy[s, li, h] = np.cumsum(sv**2) / (sv**2).sum()
    return cum, energy


def _store(tmp_path, scores, causal, name="a.zarr", **attrs):
    p = write_store(tmp_path / name, scores, causal=causal, batch=4)
    if attrs:
        g = zarr.open_group(p, mode="a")
        g.attrs.update(attrs)
    return p


@pytest.mark.parametrize("view, causal", [("all", False), ("prefix", False), ("prefix", True)])
def test_matches_numpy_softmax_and_svd_of_every_input(tmp_path, view, causal):
    scores = low_rank_scores(10, 2, 3, 16, rank=3, noise=0.5, seed=1) * 2
    # two shards, chunked by 4: the 10 sequences come in chunks 4, 4, 2 and 4 more
    shards = [
        _store(tmp_path, scores[:6], causal, "s0.zarr"),
        _store(tmp_path, scores[6:], causal, "s1.zarr"),
    ]
    res = per_input_spectrum(shards, view)
    cum, energy = brute_force(scores, view, causal)
    np.testing.assert_allclose(res["cumulative"], cum.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(res["energy"], energy.mean(axis=0), rtol=0, atol=1e-12)
    q = quarter_index(res["d"])
    np.testing.assert_allclose(res["at_quarter"], cum[..., q - 1], rtol=0, atol=1e-12)
    assert (res["n_inputs"] == 10).all()
    curves, summary = per_input_tables(res)
    assert list(curves.columns) == CURVE_COLUMNS and list(summary.columns) == SUMMARY_COLUMNS
    assert len(curves) == 2 * 3 * res["d"] and len(summary) == 2 * 3
    head = summary[(summary.layer == 1) & (summary["head"] == 2)].iloc[0]
    x = cum[:, 1, 2, q - 1]
    assert head.value_at_quarter == pytest.approx(x.mean(), abs=1e-12)
    assert head.value_at_quarter_sd == pytest.approx(x.std(ddof=1), abs=1e-12)
    assert (head.value_at_quarter_min, head.value_at_quarter_max) == pytest.approx((x.min(), x.max()), abs=1e-12)
    assert head.energy_at_quarter == pytest.approx(energy[:, 1, 2, q - 1].mean(), abs=1e-12)
    on_curve = curves[(curves.layer == 1) & (curves["head"] == 2) & (curves["index"] == q)].cumulative.iloc[0]
    assert on_curve == head.value_at_quarter


def test_curves_rise_to_one_and_the_energy_curve_lies_above(tmp_path):
    scores = low_rank_scores(8, 2, 2, 16, rank=4, noise=1.0, seed=2)
    res = per_input_spectrum([_store(tmp_path, scores, False)], "all")
    for c in (res["cumulative"], res["energy"]):
        assert (np.diff(c, axis=-1) >= -1e-12).all()
        np.testing.assert_allclose(c[..., -1], 1.0, rtol=0, atol=1e-12)
        assert (c > 0).all() and (c <= 1 + 1e-12).all()
    # for descending σ the share of σ² in the top j is at least the share of σ
    assert (res["energy"] >= res["cumulative"] - 1e-12).all()
    c, e = normalised_cumulative(np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(c[0], [0.75, 1.0, 1.0])
    np.testing.assert_allclose(e[0], [0.9, 1.0, 1.0])
    assert np.isnan(c[1]).all() and np.isnan(e[1]).all()  # an empty block has no spectrum


def test_the_softmax_runs_over_the_whole_causal_row(tmp_path):
    """In the prefix view of a causal model each query also sees the keys after the view up to itself:
    those take part in the softmax. A softmax over the view's keys alone would give other numbers."""
    n = 16
    scores = low_rank_scores(4, 1, 2, n, rank=3, noise=1.0, seed=3) * 3
    res = per_input_spectrum([_store(tmp_path, scores, True)], "prefix")
    cum, _ = brute_force(scores, "prefix", True)
    np.testing.assert_allclose(res["cumulative"], cum.mean(axis=0), atol=1e-12)
    qs, ks = view_slices("prefix", n, True)
    alone = np.zeros_like(cum)
    for s in range(4):
        for h in range(2):
            S = scores[s, 0, h, qs, ks].astype(np.float64)
            P = np.exp(S - S.max(1, keepdims=True))
            sv = np.linalg.svd(P / P.sum(1, keepdims=True), compute_uv=False)
            alone[s, 0, h] = np.cumsum(sv) / sv.sum()
    assert np.abs(alone.mean(axis=0) - res["cumulative"]).max() > 1e-3
    # and a bidirectional store of the same scores differs too: the future keys are not masked there
    res_bi = per_input_spectrum([_store(tmp_path, scores, False, "bi.zarr")], "prefix")
    assert np.abs(res_bi["cumulative"] - res["cumulative"]).max() > 1e-3


@pytest.mark.parametrize("view, causal", [("all", False), ("prefix", False), ("prefix", True)])
def test_identical_rows_give_a_rank_one_block(tmp_path, view, causal):
    """Every query with the same scores: P's view block is rank one (under a causal mask its rows are
    proportional, the row sums differing), so the whole sum is in the first singular value."""
    rng = np.random.default_rng(4)
    n = 16
    v = rng.standard_normal((6, 2, 2, 1, n)).astype(np.float32) * 2
    scores = np.broadcast_to(v, (6, 2, 2, n, n)).copy()
    res = per_input_spectrum([_store(tmp_path, scores, causal)], view)
    np.testing.assert_allclose(res["cumulative"][..., 0], 1.0, atol=1e-9)
    np.testing.assert_allclose(res["at_quarter"], 1.0, atol=1e-9)
    _, summary = per_input_tables(res)
    np.testing.assert_allclose(summary.value_at_quarter, 1.0, atol=1e-9)
    # and noise-level scores are far from rank one at index 1
    noisy = per_input_spectrum(
        [_store(tmp_path, rng.standard_normal((6, 2, 2, n, n)).astype(np.float32), causal, "noise.zarr")], view
    )
    assert noisy["cumulative"][..., 0].max() < 0.6


def test_sinks_take_part_in_the_softmax(tmp_path):
    scores = low_rank_scores(4, 2, 2, 16, rank=3, noise=1.0, seed=5)
    sinks = np.array([[1.5, -0.5], [-np.inf, -np.inf]], dtype=np.float32)  # layer 1 has no sink
    p = _store(tmp_path, scores, True)
    zarr.open_group(p, mode="a").create_array("sinks", data=sinks)
    res = per_input_spectrum([p], "prefix")
    cum, _ = brute_force(scores, "prefix", True, sinks=sinks.astype(np.float64))
    np.testing.assert_allclose(res["cumulative"], cum.mean(axis=0), atol=1e-12)
    plain = per_input_spectrum([_store(tmp_path, scores, True, "plain.zarr")], "prefix")
    assert np.abs(plain["cumulative"][0] - res["cumulative"][0]).max() > 1e-4
    np.testing.assert_allclose(plain["cumulative"][1], res["cumulative"][1], atol=1e-12)


def test_layers_whose_mask_hides_the_view_are_left_out(tmp_path):
    scores = low_rank_scores(4, 2, 2, 16, seed=6)
    masks = [{"kind": "bidirectional"}, {"kind": "bidirectional_sliding_window", "window": 4}]
    p = _store(tmp_path, scores, False, layers=[3, 7], layer_masks=masks)
    res = per_input_spectrum([p], "all")
    assert res["attrs"]["layers"] == [3] and res["cumulative"].shape[0] == 1
    assert [x["layer"] for x in res["attrs"]["skipped_layers"]] == [7]
    cum, _ = brute_force(scores[:, :1], "all", False)
    np.testing.assert_allclose(res["cumulative"][0], cum.mean(axis=0)[0], atol=1e-12)
    curves, summary = per_input_tables(res)
    assert set(curves.layer) == {3} and set(summary.layer) == {3}


def test_quarter_index_is_the_ceiling_of_d_over_4():
    assert [quarter_index(d) for d in (1, 3, 4, 6, 16, 64, 128)] == [1, 1, 1, 2, 4, 16, 32]


def test_figure_helpers_reduce_over_heads(tmp_path):
    scores = low_rank_scores(6, 2, 3, 16, rank=3, noise=0.5, seed=7)
    curves, summary = per_input_tables(per_input_spectrum([_store(tmp_path, scores, False)], "all"))
    lc = layer_curves(curves)
    assert len(lc) == 2 * 16 and list(lc.columns) == ["layer", "index", "q25", "median", "q75"]
    x = curves[(curves.layer == 1) & (curves["index"] == 4)].cumulative
    assert lc[(lc.layer == 1) & (lc["index"] == 4)]["median"].iloc[0] == pytest.approx(x.median())
    layers, grid = head_grid(summary)
    assert layers == [0, 1] and grid.shape == (2, 3)
    assert grid[1, 2] == summary[(summary.layer == 1) & (summary["head"] == 2)].value_at_quarter.iloc[0]


def test_claims_reference_row_has_the_median_and_range_over_heads(tmp_path):
    scores = low_rank_scores(6, 2, 3, 16, rank=3, noise=0.5, seed=8)
    res = per_input_spectrum([_store(tmp_path, scores, False)], "all")
    _, summary = per_input_tables(res)
    path = tmp_path / "per_input_summary.csv"
    summary.to_csv(path, index=False)
    headline = make_row(
        "C1", "spectrum.csv", model="synthetic", view="all", variant="row_centered", value=0.31, state="supported"
    )
    headline.update(role="headline", _n=16)
    (row,) = c1_per_input_rows([path], [headline])
    v = summary.value_at_quarter
    assert row["claim"] == "C1" and row["state"] == "reference" and row["role"] == ""
    assert (row["model"], row["view"], row["source"]) == ("synthetic", "all", str(path))
    assert row["value"] == pytest.approx(float(np.median(v)), abs=1e-12)
    assert f"range {v.min():.2f}–{v.max():.2f}" in row["spread"]
    q25, q75 = np.percentile(v, [25, 75])
    assert f"IQR {q25:.2f}–{q75:.2f}" in row["spread"]
    assert "index d/4" in row["quantity"] and "not the paper's claim" in row["verdict"]
    assert "k90/d = 0.31" in row["verdict"] and "(row_centered rows at n = 16: supported)" in row["verdict"]
    # without a headline of its model and view, it says so
    (alone,) = c1_per_input_rows([path], [])
    assert "no C1 headline" in alone["verdict"]
