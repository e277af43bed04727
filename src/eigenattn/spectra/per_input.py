"""The per-input spectrum of attention probabilities (docs/method.md §12): Linformer's analysis
(Wang et al. 2020, Figure 1), beside the paper's C1.

For one input sequence, layer and query head, ``P = softmax(S + mask)`` over the model's whole
attention row (the layer's own mask, and the head's sink column where the store has one), and
``B = P[queries, keys]`` is its view block, |Q| × d. With the singular values
``σ_1 ≥ … ≥ σ_r`` of B (r = min(|Q|, d), which is d in both views):

- ``cumulative[j] = Σ_{i≤j} σ_i / Σ_i σ_i``, Linformer's "normalized cumulative singular value";
- ``energy[j] = Σ_{i≤j} σ_i² / Σ_i σ_i²``, the share of ``‖B‖_F²`` in the best rank-j approximation.

Both are averaged over the inputs; ``quarter_index(d) = ⌈d/4⌉`` (1-based) is where Linformer reads
its curve (index 128 of n = 512). A value near 1 there says that each input's matrix is close to
low-rank. That is not the paper's C1, which is about how the scores vary *across* inputs (§3-4).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from eigenattn.capture.masks import layer_masks, select_visible, visibility
from eigenattn.capture.recompute import open_token_shard
from eigenattn.config.views import view_slices
from eigenattn.storage.score_source import open_score_source
from eigenattn.storage.store import open_store

DEFINITION = (
    "per input sequence, layer and query head: P = softmax(S + mask) over the whole attention row (the layer's "
    "mask, plus the head's sink column where the store has sinks), B = P[view queries, view keys]; sigma = singular "
    "values of B, descending; cumulative[j] = sum_{i<=j} sigma_i / sum_i sigma_i (Linformer, Wang et al. 2020, "
    "Fig. 1); energy[j] = sum_{i<=j} sigma_i^2 / sum_i sigma_i^2; both averaged over inputs; index j is 1-based; "
    "the quarter index is ceil(d/4)"
)
CURVE_COLUMNS = [
    "model",
    "view",
    "split",
    "n_inputs",
    "layer",
    "head",
    "d",
    "index",
    "cumulative",
    "cumulative_energy",
]
SUMMARY_COLUMNS = [
    "model",
    "view",
    "split",
    "n_inputs",
    "layer",
    "head",
    "d",
    "quarter_index",
    "value_at_quarter",
    "value_at_quarter_sd",
    "value_at_quarter_min",
    "value_at_quarter_max",
    "energy_at_quarter",
]


def quarter_index(d: int) -> int:
    """The 1-based index at which the curve is read: ⌈d/4⌉ (d/4 when 4 divides d)."""
    return max(1, math.ceil(d / 4))


def view_probabilities(block: np.ndarray, visible: np.ndarray, qs: slice, ks: slice, sinks=None) -> np.ndarray:
    """The view block of the attention probabilities, float64 (..., H, |Q|, |K|).

    ``block``: scores (..., H, n, n) of one layer; ``visible``: its (n, n) mask, True where a query
    sees a key; ``sinks``: one logit per head, or None. The softmax runs over the whole row (every
    key the query sees, and the sink), not over the view's keys alone.
    """
    s = np.where(visible[qs], np.asarray(block[..., qs, :], dtype=np.float64), -np.inf)
    top = s.max(axis=-1, keepdims=True)  # finite: every query sees at least itself
    sink = None
    if sinks is not None:
        sink = np.asarray(sinks, dtype=np.float64)[:, None, None]
        top = np.maximum(top, sink)
    e = np.exp(s - top)
    z = e.sum(axis=-1, keepdims=True)
    if sink is not None:
        z += np.exp(sink - top)
    return e[..., ks] / z


def singular_values(blocks: np.ndarray) -> np.ndarray:
    """Singular values, descending, of a batch of matrices (..., m, k), in float64 (torch's batched
    LAPACK: one call for every input and head of a chunk)."""
    import torch  # here: only this stage's job pays for the import

    return torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float64))).numpy()


def normalised_cumulative(sv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative, energy) along the last axis of singular values (..., r): the cumulative sum of
    σ and of σ², each over its total. NaN where every σ is 0 (a block the mask leaves empty)."""
    sv = np.asarray(sv, dtype=np.float64)
    out = []
    for x in (sv, sv * sv):
        total = x.sum(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(total > 0, np.cumsum(x, axis=-1) / total, np.nan))
    return out[0], out[1]


def _sinks_by_layer(shard) -> dict[int, np.ndarray]:
    """The per-head sink logits of each stored layer that has any (empty for models without sinks)."""
    g = open_store(shard)
    if "sinks" not in g:
        return {}
    table = np.asarray(g["sinks"][:], dtype=np.float64)
    return {int(layer): table[i] for i, layer in enumerate(g.attrs["layers"]) if np.isfinite(table[i]).any()}


def per_input_spectrum(shards, view: str, expect: dict | None = None) -> dict:
    """The per-input spectra of every analysed layer and head of ``view``, from the score shards.

    Reads one stored chunk of sequences of one layer at a time. Returns ``attrs`` (of the store,
    with the kept layers), ``d``, ``n_inputs`` (L, H), the mean ``cumulative`` and ``energy`` curves
    (L, H, r), and the per-input values at the quarter index, ``at_quarter`` and
    ``energy_at_quarter`` (N, L, H; NaN for an input whose block is empty).
    """
    source, attrs = open_score_source(shards, expect, recompute=open_token_shard)
    n, causal = int(attrs["seq_len"]), bool(attrs["causal"])
    qs, ks = view_slices(view, n, causal)
    sinks = _sinks_by_layer(shards[0])
    source, attrs = select_visible(source, attrs, view)  # layers whose mask hides part of the view are left out
    N, L, H = source.shape[:3]
    d = ks.stop - ks.start
    r = min(qs.stop - qs.start, d)
    q = quarter_index(d)
    sums = {k: np.zeros((L, H, r)) for k in ("cumulative", "energy")}
    count = np.zeros((L, H), dtype=np.int64)
    at_q = {k: np.full((N, L, H), np.nan) for k in ("cumulative", "energy")}
    edges = np.cumsum((0, *source.seq_chunks))
    for li, (layer, info) in enumerate(zip(attrs["layers"], layer_masks(attrs))):
        visible = visibility(info, n)
        for s0, s1 in zip(edges[:-1], edges[1:]):
            P = view_probabilities(source.read(int(s0), int(s1), li, slice(None)), visible, qs, ks, sinks.get(layer))
            curves = dict(zip(("cumulative", "energy"), normalised_cumulative(singular_values(P))))
            ok = np.isfinite(curves["cumulative"][..., -1])  # (b, H)
            count[li] += ok.sum(axis=0)
            for k, c in curves.items():
                sums[k][li] += np.where(ok[..., None], c, 0.0).sum(axis=0)
                at_q[k][s0:s1, li] = c[..., q - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {k: v / np.where(count > 0, count, np.nan)[..., None] for k, v in sums.items()}
    return {
        "attrs": attrs,
        "view": view,
        "d": d,
        "quarter_index": q,
        "n_inputs": count,
        "cumulative": means["cumulative"],
        "energy": means["energy"],
        "at_quarter": at_q["cumulative"],
        "energy_at_quarter": at_q["energy"],
    }


def per_input_tables(result: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curves, summary) of :func:`per_input_spectrum`: per_input.csv, one row per layer, head and
    index j = 1..r, and per_input_summary.csv, one row per layer and head (docs/data-contract.md)."""
    a = result["attrs"]
    L, H, r = result["cumulative"].shape
    layers = np.asarray(a["layers"], dtype=np.int64)
    base = {"model": a["model"], "view": result["view"], "split": a.get("split", "")}
    curves = pd.DataFrame(
        {
            **base,
            "n_inputs": np.repeat(result["n_inputs"].ravel(), r),
            "layer": np.repeat(layers, H * r),
            "head": np.tile(np.repeat(np.arange(H), r), L),
            "d": result["d"],
            "index": np.tile(np.arange(1, r + 1), L * H),
            "cumulative": result["cumulative"].ravel(),
            "cumulative_energy": result["energy"].ravel(),
        },
        columns=CURVE_COLUMNS,
    )
    q = result["quarter_index"]
    sd, lo, hi = _spread_over_inputs(result["at_quarter"])
    summary = pd.DataFrame(
        {
            **base,
            "n_inputs": result["n_inputs"].ravel(),
            "layer": np.repeat(layers, H),
            "head": np.tile(np.arange(H), L),
            "d": result["d"],
            "quarter_index": q,
            "value_at_quarter": result["cumulative"][..., q - 1].ravel(),
            "value_at_quarter_sd": sd.ravel(),
            "value_at_quarter_min": lo.ravel(),
            "value_at_quarter_max": hi.ravel(),
            "energy_at_quarter": result["energy"][..., q - 1].ravel(),
        },
        columns=SUMMARY_COLUMNS,
    )
    return curves, summary


def _spread_over_inputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(standard deviation (N − 1), min, max) over axis 0 of the finite values; NaN where there are
    too few (two for the deviation, one for the range)."""
    ok = np.isfinite(x)
    k = ok.sum(axis=0)
    mean = np.where(ok, x, 0.0).sum(axis=0) / np.maximum(k, 1)
    var = (np.where(ok, x - mean, 0.0) ** 2).sum(axis=0) / np.maximum(k - 1, 1)
    sd = np.where(k > 1, np.sqrt(var), np.nan)
    lo = np.where(k > 0, np.where(ok, x, np.inf).min(axis=0), np.nan)
    hi = np.where(k > 0, np.where(ok, x, -np.inf).max(axis=0), np.nan)
    return sd, lo, hi
