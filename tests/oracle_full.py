"""The full-matrix analysis as it was before the per-head routes (eigenattn 0.x, commit ddca1ba):
every layer's (H, N, N) Gram at once, O(N³) centring with H = I − 11ᵀ/N, fancy-indexed halves.
Kept verbatim as an independent oracle for eigenattn.spectra.full_spectra (tests compare the two at 1e-9);
not used by the pipeline."""

from __future__ import annotations

import dask
import numpy as np

from eigenattn.config.views import view_slices
from eigenattn.errors import InputError
from eigenattn.spectra.moments import check_variant, half_block_index, whole_heads
from eigenattn.spectra.rows import eigh_desc


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
    panel = int(max(1, (memory_mb * 2**20 / 2) // block_bytes))

    def vectors(layer: int, i: int) -> np.ndarray:  # (H, b, D) of sequence block i
        block = scores[edges[i] : edges[i + 1], layer : layer + 1].compute(scheduler="sync")
        return np.ascontiguousarray(
            _view_vectors(block, qs, ks, variant, shift[layer : layer + 1])[:, 0].transpose(1, 0, 2)
        )

    def layer_gram(layer: int) -> np.ndarray:
        G = np.empty((H, N, N))
        for p0 in range(0, nb, panel):
            held = {i: vectors(layer, i) for i in range(p0, min(p0 + panel, nb))}
            for j in range(p0, nb):
                vj = held[j] if j in held else vectors(layer, j)
                for i, vi in held.items():
                    if i <= j:
                        g = np.matmul(vi, np.swapaxes(vj, -1, -2))
                        G[:, edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = g
                        G[:, edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = np.swapaxes(g, -1, -2)
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
        raise InputError(
            "scores", f"held-out explained variance needs at least 2 sequences per half, got {split} and {N - split}"
        )
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
    split = int(np.sum(scores.chunks[0][: half_block_index(scores.chunks[0])]))
    half_w, half_t = half_spectra(g0, split)
    return {
        "eigenvalues": np.clip(w[..., :r], 0.0, None),
        "total_variance": total,
        "n_samples": N,
        "dim": D,
        "ev_heldout": heldout_explained_variance(g0, split),
        "half_eigenvalues": half_w,
        "half_total_variance": half_t,
        "split_sequence": split,
    }
