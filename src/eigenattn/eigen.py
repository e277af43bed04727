"""Eigen analysis of attention scores: row covariances (docs/method.md §3) and whole view blocks via
the Gram matrix (§4). All reductions are Dask graphs; the scheduler is chosen by the caller."""

from __future__ import annotations

import dask
import numpy as np

from .errors import InputError
from .moments import (block_moments, check_variant, half_block_index, merge_packed, moments_to_covariance,
                      reduce_moments, unpack, view_slices, whole_heads)

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
    out = _spectra(merge_packed(np.stack([pa, pb]), axis=0, keepdims=False))
    out["halves"] = {"a": _spectra(pa), "b": _spectra(pb), "split_sequence": int(np.sum(scores.chunks[0][:i]))}
    return out


def _view_vectors(block, qs, ks, variant, shift=None):
    """Vectorised view blocks of a score block (b, L, H, n, n) -> float64 (b, L, H, |Q||K|)."""
    x = np.asarray(block[..., qs, ks], dtype=np.float64)
    if variant == "row_centered":
        x = x - x.mean(axis=-1, keepdims=True)
    x = x.reshape(x.shape[:3] + (-1,))
    return x if shift is None else x - shift


def full_gram(scores, view: str, variant: str, causal: bool, memory_mb: float) -> tuple[np.ndarray, int, int]:
    """Gram matrices (L, H, N, N) of shifted, vectorised view blocks; returns (G0, N, D).

    G0 = (V - c)(V - c)ᵀ is centred later, exactly, with H = I - 11ᵀ/N (the centred Gram is shift
    invariant; the shift c, the first sequence's block, keeps the float64 sums well conditioned).
    No (|Q||K|)-dimensional covariance is ever formed, and the data are streamed: one Dask task
    per layer holds a panel of sequence blocks (as many as fit in half of ``memory_mb``) and
    streams every later block past it, re-reading blocks from the store when the panel cannot
    hold them all. Peak memory per task is about ``memory_mb`` plus the (H, N, N) Gram itself,
    whatever N is.
    """
    check_variant(variant)
    n = scores.shape[-1]
    qs, ks = view_slices(view, n, causal)
    D = (qs.stop - qs.start) * (ks.stop - ks.start)
    scores = whole_heads(scores)
    N, L, H = scores.shape[:3]
    edges = np.concatenate([[0], np.cumsum(scores.chunks[0])]).astype(int)
    nb = len(edges) - 1
    shift = _view_vectors(scores[:1].compute(), qs, ks, variant)[0]  # (L, H, D): small
    block_bytes = max(scores.chunks[0]) * H * D * 8
    panel = int(max(1, (memory_mb * 2 ** 20 / 2) // block_bytes))

    def vectors(layer: int, i: int) -> np.ndarray:  # (H, b, D) of sequence block i
        block = scores[edges[i]:edges[i + 1], layer:layer + 1].compute(scheduler="sync")
        return np.ascontiguousarray(_view_vectors(block, qs, ks, variant, shift[layer:layer + 1])[:, 0]
                                    .transpose(1, 0, 2))

    def layer_gram(layer: int) -> np.ndarray:
        G = np.empty((H, N, N))
        for p0 in range(0, nb, panel):
            held = {i: vectors(layer, i) for i in range(p0, min(p0 + panel, nb))}
            for j in range(p0, nb):
                vj = held[j] if j in held else vectors(layer, j)
                for i, vi in held.items():
                    if i <= j:
                        g = np.matmul(vi, np.swapaxes(vj, -1, -2))
                        G[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = g
                        G[:, edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = np.swapaxes(g, -1, -2)
        return G

    grams = dask.compute(*[dask.delayed(layer_gram)(layer) for layer in range(L)])
    return np.stack(grams), N, D


def center_gram(g0: np.ndarray) -> np.ndarray:
    N = g0.shape[-1]
    h = np.eye(N) - 1.0 / N
    return h @ g0 @ h


def heldout_explained_variance(g0: np.ndarray, split: int) -> np.ndarray:
    """Cross-validated EV(k) of vectorised blocks from their uncentred Gram matrix (..., N, N).

    The sequences are split at ``split`` into halves a and b. Half a's principal directions in
    sample space are e_j = X_aᶜᵀ u_j / √μ_j (u_j, μ_j: eigenpairs of a's centred Gram), so the
    variance of half b along them is ‖G_baᶜ u_j‖² / μ_j, with G_baᶜ the cross Gram centred on both
    sides by each half's own mean. EV_cv(k) is the share of b's total variance inside a's top-k
    directions, averaged with the same quantity from b to a, for k = 1..min(|a|, |b|) − 1.
    It is what a k-dimensional subspace estimated from one half explains of unseen data.
    """
    N = g0.shape[-1]
    idx = (np.arange(split), np.arange(split, N))
    r = min(split, N - split) - 1
    if r < 1:
        raise InputError(f"held-out explained variance needs at least 2 sequences per half, got {split} and "
                         f"{N - split}")
    out = []
    for a, b in (idx, idx[::-1]):
        ha = np.eye(len(a)) - 1.0 / len(a)
        hb = np.eye(len(b)) - 1.0 / len(b)
        gaa = ha @ g0[..., a[:, None], a[None, :]] @ ha
        gba = hb @ g0[..., b[:, None], a[None, :]] @ ha
        tot_b = np.trace(hb @ g0[..., b[:, None], b[None, :]] @ hb, axis1=-2, axis2=-1)
        mu, u = eigh_desc(gaa)
        mu, u = mu[..., :r], u[..., :r]
        ok = mu > 1e-12 * np.maximum(mu[..., :1], np.finfo(np.float64).tiny)
        var_b = np.where(ok, (np.matmul(gba, u) ** 2).sum(axis=-2) / np.where(ok, mu, 1.0), 0.0)
        out.append(np.cumsum(var_b, axis=-1) / np.where(tot_b > 0, tot_b, 1.0)[..., None])
    return np.clip(0.5 * (out[0] + out[1]), 0.0, 1.0)


def half_spectra(g0: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (2, ..., r_half) and total variances (2, ...) of each half's own covariance."""
    N = g0.shape[-1]
    out_w, out_t = [], []
    r = min(split, N - split) - 1
    for idx in (np.arange(split), np.arange(split, N)):
        g = center_gram(g0[..., idx[:, None], idx[None, :]])
        out_w.append(np.clip(np.linalg.eigvalsh(g)[..., ::-1][..., :r], 0.0, None) / (len(idx) - 1))
        out_t.append(np.trace(g, axis1=-2, axis2=-1) / (len(idx) - 1))
    return np.stack(out_w), np.stack(out_t)


def full_spectrum(scores, view: str, variant: str, causal: bool, memory_mb: float) -> dict:
    """Eigenvalues of the sample covariance of vectorised view blocks, the exact total variance,
    the held-out explained variance of half-sample subspaces (see heldout_explained_variance), and
    each half's own spectrum (whose disagreement is the split-half noise of k_p).

    The nonzero eigenvalues of C = Vc^T Vc / (N-1) equal those of the Gram Vc Vc^T / (N-1); the total
    variance (sum of per-coordinate variances) is trace(C) = trace(G) / (N-1), exactly.
    """
    g0, N, D = full_gram(scores, view, variant, causal, memory_mb)
    g = center_gram(g0)
    w = np.linalg.eigvalsh(g)[..., ::-1] / (N - 1)
    total = np.trace(g, axis1=-2, axis2=-1) / (N - 1)
    r = min(N - 1, D)
    split = int(np.sum(scores.chunks[0][:half_block_index(scores.chunks[0])]))
    half_w, half_t = half_spectra(g0, split)
    return {"eigenvalues": np.clip(w[..., :r], 0.0, None), "total_variance": total, "n_samples": N, "dim": D,
            "ev_heldout": heldout_explained_variance(g0, split), "half_eigenvalues": half_w,
            "half_total_variance": half_t, "split_sequence": split}


def heldout_ev_rows(Ua: np.ndarray, lam_a: np.ndarray, Ub: np.ndarray, lam_b: np.ndarray) -> np.ndarray:
    """Cross-validated EV(k), k = 1..d, of row spectra fitted on two halves of the sequences.

    Share of half b's variance tr(U_a,kᵀ C_b U_a,k) / tr C_b inside half a's top-k eigenvectors,
    averaged with the same share from b to a. ``U``: (..., d, d) eigenvectors (columns, descending),
    ``lam``: (..., d) eigenvalues.
    """
    g2 = np.matmul(np.swapaxes(Ua, -1, -2), Ub) ** 2  # [i, j] = (u_a,i · u_b,j)^2
    tot_a, tot_b = lam_a.sum(-1), lam_b.sum(-1)
    a_to_b = np.cumsum(np.matmul(g2, lam_b[..., None])[..., 0], -1) / np.where(tot_b > 0, tot_b, 1)[..., None]
    b_to_a = np.cumsum(np.matmul(np.swapaxes(g2, -1, -2), lam_a[..., None])[..., 0], -1) / \
        np.where(tot_a > 0, tot_a, 1)[..., None]
    return np.clip(0.5 * (a_to_b + b_to_a), 0.0, 1.0)


def is_bounded(ev_heldout: np.ndarray, p: float, n_samples: int, dim: int) -> np.ndarray:
    """Whether k_p is only a lower bound ('≥') because the sample count cannot support it.

    With N samples the sample covariance has rank ≤ N − 1, and its top eigenvalues over-state what
    a subspace of that size explains of the population. When N − 1 < dim, k_p counts as measured
    only if a subspace fitted on one half of the sequences reaches p of the other half's variance
    (``ev_heldout`` reaches p within its length, i.e. within the half's rank); otherwise the sample
    count, not the data, limits k_p. With N − 1 ≥ dim nothing is bounded.
    """
    reached = np.asarray(ev_heldout)[..., -1] >= p - 1e-12
    return (n_samples - 1 < dim) & ~reached


def constant_alignment(U: np.ndarray) -> np.ndarray:
    """|⟨u₁, 1/√d⟩|: how closely the top eigenvector is the constant (row-offset) direction."""
    d = U.shape[-2]
    return np.abs(U[..., :, 0].sum(-1)) / np.sqrt(d)
