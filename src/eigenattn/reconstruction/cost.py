"""The project's one cost model of attention (docs/method.md, "Peers at equal cost").

A method's cost is its multiply-adds (MACs) per sequence and head: the scores it computes, plus
its reconstruction, plus P·V. A view is a block of ``nq`` queries against ``d`` keys; everything
outside it stays exact and costs the same for every method, so costs compare the view block:

==================  ============================================================================
exact               ``nq·d·dh`` scores + ``nq·d·dh`` P·V
paper, dense W      ``nq·s·dh`` + ``nq·s·d`` (â = W a_T + b) + ``nq·d·dh``
paper, rank k       ``nq·s·dh`` + ``nq·s·k + nq·k·d`` (W = U_k G, applied as two products) + ``nq·d·dh``
mean                ``nq·s·dh`` + ``nq·d·dh`` (the rest of the row is μ, added, not multiplied)
subset_only         ``nq·s·dh`` + ``nq·s·dh``
topk_oracle         ``nq·s·dh`` + ``nq·s·dh``: what an s-key method pays; finding the s keys needs
                    every score, so it is a bound, never a method
sink_window         ``nq·s·dh`` + ``nq·s·dh``
vertical_slash      ``q_last·d·dh`` (the estimation queries) + ``nq·s·dh`` + ``nq·s·dh``
nystrom (m)         ``nq·m·dh + m·m·dh + m·d·dh`` (the three kernels) + ``m³`` (pseudo-inverse) +
                    ``m·d·dh + m·m·dh + nq·m·dh`` (P·V in the factored order)
linformer (s)       ``2·d·s·dh`` (E K, F V) + ``nq·s·dh`` + ``nq·s·dh``
uniform             ``d·dh``: no scores; the mean of V, shared by every query (the training floor)
==================  ============================================================================

Selecting keys, softmax, segment means and additions are not counted: they are O(n·d) or less
without a d_head factor. The eigenspace estimator is charged the cheaper of its dense and
factored forms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from eigenattn.config.schema import enum

BASELINES = ("mean", "subset_only")
PAPER = tuple(e for e in enum("reconstruction.estimators") if e not in BASELINES)
PEERS = enum("reconstruction.peers")
ORACLES = ("topk_oracle",)


def family(method: str) -> str:
    """paper, baseline, peer or oracle: how the tables and figures group a method."""
    if method in PAPER:
        return "paper"
    if method in BASELINES:
        return "baseline"
    if method in ORACLES:
        return "oracle"
    if method in PEERS or method == "linformer":
        return "peer"
    raise ValueError(f"unknown method '{method}'")


def exact_macs(nq: int, d: int, d_head: int) -> int:
    """Exact attention of the view block: scores and P·V."""
    return 2 * nq * d * d_head


def view_macs(method: str, *, nq: int, d: int, d_head: int, s: int, k: int = 0, q_last: int = 0) -> int:
    """MACs per sequence and head of ``method`` on a view block of nq queries and d keys.

    ``s``: the subset size (the landmark count m for nystrom, the projected length for linformer);
    ``k``: the eigenspace rank; ``q_last``: vertical_slash's estimation queries.
    """
    pv = nq * d * d_head
    sparse = 2 * nq * s * d_head
    if method == "exact":
        return exact_macs(nq, d, d_head)
    if method == "eigenspace":
        dense = nq * s * d
        factored = nq * s * k + nq * k * d if k else dense
        return nq * s * d_head + min(dense, factored) + pv
    if method in ("conditional_gaussian", "partial_fixed", "partial_learned"):
        return nq * s * d_head + nq * s * d + pv
    if method == "mean":
        return nq * s * d_head + pv
    if method in ("subset_only", "topk_oracle", "sink_window"):
        return sparse
    if method == "vertical_slash":
        return q_last * d * d_head + sparse
    if method == "nystrom":
        m = s
        kernels = nq * m * d_head + m * m * d_head + m * d * d_head
        return kernels + m**3 + m * d * d_head + m * m * d_head + nq * m * d_head
    if method == "linformer":
        return 2 * d * s * d_head + sparse
    if method == "uniform":
        return d * d_head
    raise ValueError(f"no cost formula for method '{method}'")


def cost_share(method: str, *, nq: int, d: int, d_head: int, s: int, k: int = 0, q_last: int = 0) -> float:
    """``view_macs`` as a share of exact attention on the same block."""
    return view_macs(method, nq=nq, d=d, d_head=d_head, s=s, k=k, q_last=q_last) / exact_macs(nq, d, d_head)


def attention_flops_per_seq(variant: str, n: int, s: int, layers: int, heads: int, d_head: int) -> int:
    """MACs of a training variant's attention per sequence (the whole n×n matrix), over heads and layers."""
    return int(view_macs(variant, nq=n, d=n, d_head=d_head, s=s) * heads * layers)


# ---------------------------------------------------------------------------------------------
# the time axis (docs/method.md §15): measured shares from a latency table (clock.py measures them)

# the reconstruction table's estimators by the kernel that deploys them (the oracle has none)
KERNEL_OF = {
    "sink_window": "sink_window",
    "vertical_slash": "vertical_slash",
    "nystrom": "nystrom",
    "subset_only": "subset_only",
    "eigenspace": "paper",
    "conditional_gaussian": "paper",
    "mean": "paper",
}
OVERHEAD_N = 1024  # below this length every kernel is bound by call overhead: its times are a reference only


def with_time(recon: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """The reconstruction table with ``time_share``: each row's method's measured time share at its
    s from the view's latency table (NaN for the oracle, which has no kernel). Nyström is looked up
    with its pseudo-inverse (the table's ``strategy``); the other kernels do not depend on it."""
    strategy = latency["strategy"] if "strategy" in latency else pd.Series("-", index=latency.index)
    lat = latency.assign(strategy=strategy.fillna("-")).set_index(["method", "strategy", "s"])["time_share"]
    kernel = recon["estimator"].map(KERNEL_OF)
    share = []
    for kname, st, sz in zip(kernel, recon["strategy"].astype(str), recon["subset_size"], strict=True):
        if not isinstance(kname, str):
            share.append(np.nan)
            continue
        key = (kname, st if kname == "nystrom" and "strategy" in latency else "-", int(sz))
        share.append(float(lat.get(key, np.nan)))
    return recon.assign(time_share=share)
