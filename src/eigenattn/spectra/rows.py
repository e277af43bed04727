"""Eigen analysis of attention-score rows (docs/method.md §3) and the spectral helpers every eigen
analysis shares (EV(k), k_p, bounded flags). Row reductions are Dask graphs; the scheduler is chosen
by the caller. Whole view blocks (§4) are in :mod:`eigenattn.spectra.full_spectra`."""

from __future__ import annotations

import dask
import numpy as np

from eigenattn.spectra.moments import (
    block_moments,
    half_block_index,
    merge_packed,
    moments_to_covariance,
    reduce_moments,
    unpack,
)

P_LEVELS = (0.90, 0.95, 0.99)


def eigh_desc(cov: np.ndarray):
    """Eigenvalues (descending) and eigenvectors (columns) of symmetric matrices (..., d, d).

    Signs are fixed so that the largest-magnitude component of each eigenvector is positive,
    making outputs deterministic across BLAS builds and chunkings.
    """
    w, v = np.linalg.eigh(cov)
    w, v = w[..., ::-1], v[..., ::-1]
    idx = np.abs(v).argmax(axis=-2)
    sign = np.sign(np.take_along_axis(v, idx[..., None, :], axis=-2))
    sign[sign == 0] = 1
    return np.clip(w, 0.0, None), v * sign


def explained_variance(eigenvalues: np.ndarray, total: np.ndarray | float | None = None) -> np.ndarray:
    """EV(k) for k = 1..r along the last axis: cumulative eigenvalue sum over the total variance."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    tot = eigenvalues.sum(axis=-1) if total is None else np.asarray(total, dtype=np.float64)
    return np.cumsum(eigenvalues, axis=-1) / np.where(tot > 0, tot, 1.0)[..., None]


def k_at(ev: np.ndarray, p: float) -> np.ndarray:
    """Smallest k (1-based) with EV(k) >= p, along the last axis."""
    reached = ev >= p - 1e-12
    k = reached.argmax(axis=-1) + 1
    return np.where(reached.any(axis=-1), k, ev.shape[-1])


def _spectra(packed: np.ndarray) -> dict:
    out = {}
    for scope, pk in (("heads", packed), ("pooled", merge_packed(packed, axis=1, keepdims=False))):
        count, mean, m2 = unpack(pk)
        w, v = eigh_desc(moments_to_covariance(count, m2))
        out[scope] = {"mean": mean, "eigenvalues": w, "eigenvectors": v, "count": count.astype(np.int64)}
    return out


def row_spectrum(scores, view: str, variant: str, causal: bool, split_every: int, halves: bool = False) -> dict:
    """Per-head and pooled row spectra (numpy arrays keyed as in rows.zarr).

    With ``halves``, the moments of the first and second half of the sequences (split at a chunk
    boundary) are reduced separately and merged exactly into the total, so the split-half spectra
    (used as the noise ceiling of subspace overlap) cost no extra pass over the data.
    """
    per_block = block_moments(scores, view, variant, causal)
    if not halves:
        (packed,) = dask.compute(reduce_moments(per_block, split_every))
        return _spectra(packed)
    i = half_block_index(scores.chunks[0])
    pa, pb = dask.compute(reduce_moments(per_block[:i], split_every), reduce_moments(per_block[i:], split_every))
    return halves_spectrum(pa, pb, int(np.sum(scores.chunks[0][:i])))


def halves_spectrum(pa: np.ndarray, pb: np.ndarray, split_sequence: int) -> dict:
    """Row spectra (as :func:`row_spectrum` with ``halves``) from the packed moments of the two
    halves (L, H, d + 2, d): the whole is their exact merge. Shared by the stored and the streamed
    route (:mod:`eigenattn.spectra.streamed`)."""
    out = _spectra(merge_packed(np.stack([pa, pb]), axis=0, keepdims=False))
    out["halves"] = {"a": _spectra(pa), "b": _spectra(pb), "split_sequence": int(split_sequence)}
    return out


def heldout_ev_rows(Ua: np.ndarray, lam_a: np.ndarray, Ub: np.ndarray, lam_b: np.ndarray) -> np.ndarray:
    """Cross-validated EV(k), k = 1..d, of row spectra fitted on two halves of the sequences.

    Share of half b's variance tr(U_a,kᵀ C_b U_a,k) / tr C_b inside half a's top-k eigenvectors,
    averaged with the same share from b to a. ``U``: (..., d, d) eigenvectors (columns, descending),
    ``lam``: (..., d) eigenvalues.
    """
    g2 = np.matmul(np.swapaxes(Ua, -1, -2), Ub) ** 2  # [i, j] = (u_a,i · u_b,j)^2
    tot_a, tot_b = lam_a.sum(-1), lam_b.sum(-1)
    a_to_b = np.cumsum(np.matmul(g2, lam_b[..., None])[..., 0], -1) / np.where(tot_b > 0, tot_b, 1)[..., None]
    b_to_a = (
        np.cumsum(np.matmul(np.swapaxes(g2, -1, -2), lam_a[..., None])[..., 0], -1)
        / np.where(tot_a > 0, tot_a, 1)[..., None]
    )
    return np.clip(0.5 * (a_to_b + b_to_a), 0.0, 1.0)


def is_bounded(ev_heldout: np.ndarray, p: float, n_samples: int, dim: int, ev: np.ndarray | None = None) -> np.ndarray:
    """Whether k_p is only a lower bound ('≥') because the sample count cannot support it.

    With N samples the sample covariance has rank ≤ N − 1, and its top eigenvalues over-state what
    a subspace of that size explains of the population. When N − 1 < dim, k_p counts as measured
    only if a subspace fitted on one half of the sequences reaches p of the other half's variance
    (``ev_heldout`` reaches p within its length, i.e. within the half's rank); otherwise the sample
    count, not the data, limits k_p. With N − 1 ≥ dim nothing is bounded by the sample count.
    ``ev``: the in-sample EV(k) over the components computed; where it stays below p (a top-r
    spectrum, eigen.full_rank), k_p lies beyond them and is bounded too.
    """
    reached = np.asarray(ev_heldout)[..., -1] >= p - 1e-12
    bounded = (n_samples - 1 < dim) & ~reached
    if ev is not None:
        bounded = bounded | (np.asarray(ev)[..., -1] < p - 1e-12)
    return bounded


def constant_alignment(U: np.ndarray) -> np.ndarray:
    """|⟨u₁, 1/√d⟩|: how closely the top eigenvector is the constant (row-offset) direction."""
    d = U.shape[-2]
    return np.abs(U[..., :, 0].sum(-1)) / np.sqrt(d)
