"""Per-layer mask kinds, and which layers a view may analyse (eigenattn.capture.masks)."""

import logging

import numpy as np
import pytest
import zarr

from eigenattn.capture.masks import classify_visibility, select_visible, visibility, visible_layers
from eigenattn.errors import InputError
from synthetic import low_rank_scores, write_store

KINDS = [
    {"kind": "bidirectional"},
    {"kind": "causal"},
    {"kind": "sliding_window", "window": 3},
    {"kind": "sliding_window", "window": 1},
    {"kind": "chunked", "chunk": 3},
    {"kind": "chunked", "chunk": 4},
    {"kind": "bidirectional_sliding_window", "window": 2},
]


@pytest.mark.parametrize("info", KINDS)
def test_classify_round_trip(info):
    assert classify_visibility(visibility(info, 10)) == info


def test_windows_that_cover_the_sequence_are_plain_kinds():
    assert classify_visibility(visibility({"kind": "sliding_window", "window": 10}, 8)) == {"kind": "causal"}
    assert classify_visibility(visibility({"kind": "chunked", "chunk": 8}, 8)) == {"kind": "causal"}
    assert classify_visibility(visibility({"kind": "bidirectional_sliding_window", "window": 7}, 8)) == {
        "kind": "bidirectional"
    }


def test_unknown_pattern_is_not_classified():
    v = visibility({"kind": "causal"}, 6)
    v[4, 2] = False  # a hole that no kind describes
    assert classify_visibility(v) is None
    assert classify_visibility(~np.eye(4, dtype=bool)) is None


def _attrs(masks, n=16, causal=None):
    return {
        "model": "m",
        "layers": list(range(len(masks))),
        "seq_len": n,
        "layer_masks": masks,
        "causal": causal if causal is not None else all(m["kind"] != "bidirectional" for m in masks),
    }


def test_visible_layers_prefix_and_all(caplog):
    masks = [
        {"kind": "causal"},
        {"kind": "sliding_window", "window": 4},
        {"kind": "chunked", "chunk": 4},
        {"kind": "sliding_window", "window": 16},
    ]
    with caplog.at_level(logging.WARNING):
        kept, skipped = visible_layers(_attrs(masks), "prefix")
    assert kept == [0, 3] and [s["layer"] for s in skipped] == [1, 2]
    assert "layer 1 skipped in view 'prefix'" in caplog.text and "sliding window of 4" in skipped[0]["reason"]
    # every key of the prefix view is visible to every query of it: window >= n needed
    assert visible_layers(_attrs([{"kind": "sliding_window", "window": 15}]), "prefix")[0] == []
    enc = [{"kind": "bidirectional"}, {"kind": "bidirectional_sliding_window", "window": 4}]
    assert visible_layers(_attrs(enc), "all")[0] == [0]
    assert visible_layers(_attrs(enc), "prefix")[0] == [0]
    assert visible_layers(_attrs([{"kind": "bidirectional_sliding_window", "window": 15}]), "all")[0] == [0]


def test_stores_without_layer_masks_use_causal():
    old = {"layers": [3, 5], "seq_len": 8, "causal": True}
    assert visible_layers(old, "prefix") == ([3, 5], [])
    assert visible_layers({**old, "causal": False}, "all") == ([3, 5], [])


def test_select_visible_drops_masked_layers_from_the_dask_array():
    import dask.array as da

    s = da.from_array(np.arange(2 * 3 * 16 * 16, dtype=np.float32).reshape(2, 3, 1, 16, 16), chunks=(1, 1, 1, 16, 16))
    masks = [{"kind": "causal"}, {"kind": "sliding_window", "window": 4}, {"kind": "causal"}]
    a = {**_attrs(masks), "layers": [0, 7, 9]}
    sel, attrs = select_visible(s, a, "prefix")
    np.testing.assert_array_equal(sel.compute(), s.compute()[:, [0, 2]])
    assert attrs["layers"] == [0, 9] and attrs["layer_masks"] == [masks[0], masks[2]]
    assert [x["layer"] for x in attrs["skipped_layers"]] == [7]
    with pytest.raises(InputError, match="every captured layer's mask hides part of view 'prefix'"):
        select_visible(s[:, 1:2], {**_attrs([masks[1]]), "layers": [7]}, "prefix")


def test_eigen_and_reconstruction_skip_masked_layers(tmp_path, caplog):
    from eigenattn.config.settings import Reconstruction
    from eigenattn.reconstruction.evaluate import evaluate_view
    from eigenattn.spectra.stores import run_rows

    n = 16
    scores = low_rank_scores(8, 3, 2, n)
    masks = [{"kind": "causal"}, {"kind": "sliding_window", "window": 4}, {"kind": "causal"}]
    stores = {}
    for split, sl in (("fit", slice(0, 6)), ("held", slice(6, 8))):
        p = write_store(tmp_path / f"{split}.zarr", scores[sl], causal=True, layers=[2, 4, 6])
        zarr.open_group(p, mode="r+").attrs["layer_masks"] = masks
        stores[split] = p
    with caplog.at_level(logging.WARNING):
        run_rows([stores["fit"]], tmp_path / "rows.zarr", "prefix", ("raw",), 2)
    assert "layer 4 skipped in view 'prefix'" in caplog.text
    g = zarr.open_group(tmp_path / "rows.zarr", mode="r")
    assert g.attrs["layers"] == [2, 6] and [x["layer"] for x in g.attrs["skipped_layers"]] == [4]
    assert g["raw/mean"].shape == (2, 2, n // 2)
    np.testing.assert_allclose(g["raw/mean"][1], scores[:6, 2][:, :, n // 2 :, : n // 2].mean(axis=(0, 2)), rtol=1e-5)
    settings = Reconstruction(
        estimators=("mean",), strategies=("strided",), subset_sizes=(2,), ridge=1e-6, rank=0.5, seed=0, eval_rows=None
    )
    df = evaluate_view(tmp_path / "rows.zarr", [stores["held"]], settings, progress=False)
    assert sorted(df["layer"].unique()) == [2, 6]
