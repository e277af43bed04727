"""Vectorised view blocks for the full-matrix analysis: reading a head group's sequences, the
row_centered coordinates, and the small helpers the routes share."""

from __future__ import annotations

import numpy as np

from eigenattn.spectra.full_plan import FullPlan
from eigenattn.spectra.moments import whole_heads
from eigenattn.storage.score_source import ScoreSource


def centred_basis(k: int) -> np.ndarray:
    """An orthonormal basis (k, k − 1) of the vectors orthogonal to the constant one. A row minus
    its mean is x − x̄1 = B Bᵀ x, so ``x @ B`` holds a row_centered row exactly, inner products
    included, in one dimension fewer: the spectra are the same and their eigenproblems smaller."""
    q, _ = np.linalg.qr(np.eye(k)[:, : k - 1] - 1.0 / k)
    return np.ascontiguousarray(q)


def view_dims(qs: slice, ks: slice, variant: str) -> tuple[int, int]:
    """(D, the dimensions computed): row_centered blocks have one fewer per query row."""
    q, k = qs.stop - qs.start, ks.stop - ks.start
    return q * k, q * (k - 1) if variant == "row_centered" else q * k


def view_vectors(block: np.ndarray, qs: slice, ks: slice, variant: str, basis: np.ndarray | None = None) -> np.ndarray:
    """View blocks of a score block (b, g, n, n) as float64 vectors (g, b, D), C-contiguous; with
    ``basis`` (row_centered), each row in the coordinates of :func:`centred_basis` (g, b, |Q|(|K|−1))."""
    x = np.ascontiguousarray(block[..., qs, ks].transpose(1, 0, 2, 3), dtype=np.float64)
    if basis is not None:
        x = x @ basis
    elif variant == "row_centered":
        x -= x.mean(axis=-1, keepdims=True)
    return x.reshape(x.shape[0], x.shape[1], -1)


def raw_reader(scores):
    """(shape, sequence chunk sizes, read(s0, s1, layer, heads) -> numpy, Dask array) of a score
    array: a :class:`~eigenattn.storage.store.ScoreSource` is read directly, a Dask array through its graph."""
    if isinstance(scores, ScoreSource):
        return scores.shape, scores.seq_chunks, scores.read, scores.dask
    scores = whole_heads(scores)
    return (
        scores.shape,
        scores.chunks[0],
        lambda s0, s1, layer, heads: scores[s0:s1, layer, heads].compute(scheduler="sync"),
        lambda: scores,
    )


def head_reader(raw, layer: int, heads: slice, qs: slice, ks: slice, variant: str):
    basis = centred_basis(ks.stop - ks.start) if variant == "row_centered" else None

    def read(s0: int, s1: int) -> np.ndarray:
        return view_vectors(raw(s0, s1, layer, heads), qs, ks, variant, basis)

    return read


def ranges(start: int, stop: int, step: int):
    return [(s, min(s + step, stop)) for s in range(start, stop, step)]


def cv_share(var: np.ndarray, mu: np.ndarray, total: float) -> np.ndarray:
    """Cumulative share of the other half's variance along one half's principal directions; a
    direction whose eigenvalue is numerically zero (beyond the half's rank) adds nothing."""
    ok = mu > 1e-12 * max(mu[0] if mu.size else 0.0, np.finfo(np.float64).tiny)
    return np.cumsum(np.where(ok, var, 0.0)) / (total if total > 0 else 1.0)


def pad(x: np.ndarray, size: int, edge: bool = False) -> np.ndarray:
    """x to ``size`` entries: zeros past its end (a spectrum), or its last value (a cumulative curve)."""
    out = np.full(size, x[-1] if edge and x.size else 0.0)
    out[: min(size, x.size)] = x[:size]
    return out


def empty_outputs(g: int, plan: FullPlan) -> dict:
    return {
        "eigenvalues": np.zeros((g, plan.r)),
        "total_variance": np.zeros(g),
        "ev_heldout": np.zeros((g, plan.r_half)),
        "half_eigenvalues": np.zeros((2, g, plan.r_half)),
        "half_total_variance": np.zeros((2, g)),
    }
