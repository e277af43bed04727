"""Tiny synthetic score stores with the extraction stage's layout, for library tests."""

from __future__ import annotations

import numpy as np
import zarr

from eigenattn.storage.store import score_chunks

VARIANTS = ("raw", "row_centered")


def low_rank_scores(N, L, H, n, rank=3, noise=0.05, seed=0):
    """Scores whose rows live near a rank-`rank` affine subspace, with head-specific spectra."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((L, H, rank, n))
    coef = rng.standard_normal((N, L, H, n, rank)) * np.linspace(3, 1, rank)
    mean = rng.standard_normal((L, H, 1, n))
    s = np.einsum("nlhqr,lhrk->nlhqk", coef, basis) + mean + noise * rng.standard_normal((N, L, H, n, n))
    return s.astype(np.float32)


def write_store(path, scores, causal=False, batch=4, model="synthetic", layers=None, head_dim=8, modifiers=None):
    N, L, H, n, _ = scores.shape
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("scores", data=scores, chunks=score_chunks(batch, H, n))
    g.create_array("passage_id", data=np.arange(N, dtype=np.int64))
    g.attrs.update(
        {
            "model": model,
            "layers": layers or list(range(L)),
            "heads": H,
            "head_dim": head_dim,
            "seq_len": n,
            "causal": causal,
            "dtype": str(scores.dtype),
            "corpus": "synthetic",
            "seed": 0,
            "complete": True,
            "layer_modifiers": modifiers
            if modifiers is not None
            else [{"softcap": None, "position_bias": False, "sinks": False}] * L,
        }
    )
    return str(path)
