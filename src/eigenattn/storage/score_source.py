"""The fit shards' checked score arrays read directly in sequence ranges (no Dask graph), for stages
whose own tasks stream the sequences: the full-matrix spectra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eigenattn.errors import InputError
from eigenattn.storage.store import CheckedScores, _as_dask, _checked_arrays


class ScoreSource:
    """The shards' checked score arrays as one (N, L, H, n, n) array read in sequence ranges
    directly, without a Dask graph: one Zarr read per shard and range (zarr fetches its chunks
    concurrently), about 4x faster than the same range through Dask's per-chunk tasks. For
    stages whose own tasks stream the sequences (the full-matrix spectra). ``layers``: positions
    of the layers to expose (default all)."""

    def __init__(self, arrays: list[CheckedScores], layers=None):
        self.arrays = arrays
        self.edges = np.concatenate([[0], np.cumsum([c.shape[0] for c in arrays])]).astype(int)
        full = arrays[0].shape
        self.layers = list(range(full[1])) if layers is None else [int(i) for i in layers]
        self.shape = (int(self.edges[-1]), len(self.layers)) + tuple(full[2:])
        self.dtype = arrays[0].dtype
        self.seq_chunks = tuple(int(x) for c in arrays for x in _chunk_sizes(c.shape[0], c.arr.chunks[0]))

    def read(self, s0: int, s1: int, layer: int, heads: slice) -> np.ndarray:
        """scores[s0:s1, layer, heads] as numpy (layer: position among the exposed layers)."""
        parts = []
        for c, lo, hi in zip(self.arrays, self.edges[:-1], self.edges[1:]):
            a, b = max(s0, lo), min(s1, hi)
            if a < b:
                try:
                    parts.append(c[a - lo : b - lo, self.layers[layer], heads])
                except InputError:
                    self._locate(c, a - lo, b - lo, self.layers[layer])
                    raise
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @staticmethod
    def _locate(c: CheckedScores, a: int, b: int, layer: int) -> None:
        """Re-read a failed range chunk by chunk, so the error names the damaged chunk itself."""
        step = c.arr.chunks[0]
        for c0 in range(a // step * step, b, step):
            c[
                (slice(c0, min(c0 + step, c.shape[0])), slice(layer, layer + 1))
                + tuple(slice(0, size) for size in c.shape[2:])
            ]

    def __getitem__(self, key):
        """``source[:, idx]``: the same shards exposing only the layers at positions ``idx``."""
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)):
            raise TypeError("a ScoreSource selects layers only: source[:, positions]; use read() for data")
        layers = [self.layers[i] for i in key[1]]
        for c in self.arrays:  # recomputed scores compute ahead only the layers that will be read
            if hasattr(c, "needs"):
                c.needs(layers)
        return ScoreSource(self.arrays, layers)

    def dask(self):
        """The same array as Dask (for graph-based reductions)."""
        return _as_dask(self.arrays)[:, self.layers]


def _chunk_sizes(size: int, chunk: int) -> list[int]:
    return [min(chunk, size - s) for s in range(0, size, chunk)]


def open_score_source(shards: list[str | Path], expect: dict | None = None, recompute=None):
    """Like :func:`open_scores`, with the same checks, as a :class:`ScoreSource`."""
    arrays, attrs = _checked_arrays(shards, expect, recompute)
    return ScoreSource(arrays), attrs
