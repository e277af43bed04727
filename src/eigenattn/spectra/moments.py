"""Streaming float64 moments of attention-score rows, merged by the parallel (Chan et al.) update.

Moments travel in a *packed* array whose last two axes are ``(d + 2, d)``:

    packed[..., 0, :]  = count (repeated along d)
    packed[..., 1, :]  = mean
    packed[..., 2:, :] = M2 = sum over samples of (x - mean)(x - mean)^T

so a Dask reduction can concatenate and merge them like any other array.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from eigenattn.config.plan import half_chunk_index
from eigenattn.config.schema import enum
from eigenattn.config.views import VIEWS, view_slices  # noqa: F401  (VIEWS: the test of enums)
from eigenattn.errors import ConfigError, InputError

VARIANTS = enum("eigen.variants")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError("eigen.variants", f"unknown variant '{variant}'", f"use one of {', '.join(VARIANTS)}")


def view_rows(block: np.ndarray, qs: slice, ks: slice, variant: str) -> np.ndarray:
    """Rows of a score block (b, L, H, n, n) in a view, as contiguous float64 (L, H, b*|Q|, d)."""
    # Transpose while still float16/32 (cheap), then one contiguous float64 conversion.
    rows = np.ascontiguousarray(block[..., qs, ks].transpose(1, 2, 0, 3, 4), dtype=np.float64)
    if variant == "row_centered":
        rows -= rows.mean(axis=-1, keepdims=True)
    L, H, b, q, d = rows.shape
    return rows.reshape(L, H, b * q, d)


def pack(count, mean, m2) -> np.ndarray:
    count = np.asarray(count, dtype=np.float64)
    d = mean.shape[-1]
    out = np.empty(mean.shape[:-1] + (d + 2, d), dtype=np.float64)
    out[..., 0, :] = count[..., None]
    out[..., 1, :] = mean
    out[..., 2:, :] = m2
    return out


def unpack(packed: np.ndarray):
    return packed[..., 0, 0], packed[..., 1, :], packed[..., 2:, :]


def sample_moments(x: np.ndarray):
    """count, mean and M2 of samples along axis -2 of x (..., m, d).

    M2 = X^T X - m mu mu^T: one batched GEMM and no centred copy. Within one chunk (m ~ 10^3
    rows of scores of order 1-10) float64 loses nothing measurable to the subtraction; chunks
    then merge by the parallel update, which never subtracts large sums.
    """
    m = x.shape[-2]
    count = np.full(x.shape[:-2], m, dtype=np.float64)
    mean = x.mean(axis=-2)
    m2 = np.matmul(np.swapaxes(x, -1, -2), x)
    m2 -= m * mean[..., :, None] * mean[..., None, :]
    return count, mean, m2


def block_row_moments(block: np.ndarray, qs: slice, ks: slice, variant: str) -> np.ndarray:
    """Packed moments of one score block (b, L, H, n, n) -> (1, L, H, d+2, d)."""
    return pack(*sample_moments(view_rows(block, qs, ks, variant)))[None]


def merge_packed(packed: np.ndarray, axis: int = 0, keepdims: bool = True) -> np.ndarray:
    """Merge packed moments along ``axis`` by the parallel update.

    N = sum n_i;  mean = sum n_i mean_i / N;  M2 = sum M2_i + sum n_i (mean_i - mean)(mean_i - mean)^T.
    This is Chan et al.'s pairwise update applied to k parts at once; it is exact.
    """
    packed = np.moveaxis(packed, axis, 0)
    count, mean, m2 = unpack(packed)
    total = count.sum(axis=0)
    safe = np.where(total > 0, total, 1.0)
    mu = (count[..., None] * mean).sum(axis=0) / safe[..., None]
    dev = mean - mu[None]
    m2 = m2.sum(axis=0) + np.einsum("k...i,k...j->...ij", count[..., None] * dev, dev)
    out = pack(total, mu, m2)
    return np.expand_dims(out, axis) if keepdims else out


def _merge_chunk(a, axis=None, keepdims=True):
    return a


def _merge_combine(a, axis=None, keepdims=True):
    return merge_packed(a, axis=axis[0] if isinstance(axis, tuple) else axis, keepdims=True)


def _merge_aggregate(a, axis=None, keepdims=True):
    return merge_packed(a, axis=axis[0] if isinstance(axis, tuple) else axis, keepdims=keepdims)


def whole_heads(scores):
    """The Dask score array with its (H, n, n) axes as single chunks (extraction writes them so)."""
    if any(len(c) != 1 for c in scores.chunks[2:]):
        scores = scores.rechunk({2: -1, 3: -1, 4: -1})
    return scores


def block_moments(scores, view: str, variant: str, causal: bool):
    """Dask array (nblocks, L, H, d+2, d): packed row moments of every sequence block.

    ``scores``: Dask array (N, L, H, n, n) whose (H, n, n) axes are single chunks (as extraction
    writes them; rechunked otherwise).
    """
    check_variant(variant)
    n = scores.shape[-1]
    qs, ks = view_slices(view, n, causal)
    d = ks.stop - ks.start
    scores = whole_heads(scores)
    return da.map_blocks(
        block_row_moments,
        scores,
        qs,
        ks,
        variant,
        dtype=np.float64,
        chunks=((1,) * scores.numblocks[0], scores.chunks[1], (scores.shape[2],), (d + 2,), (d,)),
        meta=np.empty((0, 0, 0, 0, 0), dtype=np.float64),
    )


def reduce_moments(per_block, split_every: int):
    """Tree-merge packed block moments along axis 0 -> (L, H, d+2, d)."""
    return da.reduction(
        per_block,
        _merge_chunk,
        _merge_aggregate,
        combine=_merge_combine,
        axis=0,
        keepdims=False,
        dtype=np.float64,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
    )


def half_block_index(chunks_n) -> int:
    """Block index splitting the sequences into two halves at a chunk boundary (>= 1 block each)."""
    nb = len(chunks_n)
    if nb < 2:
        raise too_few_chunks(f"got {nb}")
    return half_chunk_index([int(c) for c in chunks_n])


def too_few_chunks(detail: str) -> ConfigError:
    """The error of both routes when the fit split has fewer than two sequence chunks, so that one
    half of the split-half statistics would be empty."""
    return ConfigError(
        "extraction.chunk_sequences",
        f"split-half statistics need at least 2 sequence chunks, {detail}",
        "use a smaller extraction.chunk_sequences or more passages",
    )


def moments_to_covariance(count, m2):
    if np.any(count < 2):
        raise InputError(
            "score rows",
            "fewer than 2 samples for a covariance",
            "analyse at least 2 sequences (sampling.n_sequences.fit)",
        )
    return m2 / (count[..., None, None] - 1.0)
