"""How the full-matrix analysis (eigenattn.spectra.full_spectra) is cut into tasks, what each holds, and
the peak memory that follows: what the eigen rules ask the scheduler for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eigenattn.config.schema import enum
from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError

ROUTES = enum("eigen.full_route")
BASE_MB = 450  # interpreter, numpy/scipy/zarr/dask and the job set-up: measured 220–350 MB
_F8 = 8


def choose_route(N: int, D: int, route: str = "auto") -> str:
    """The cheaper exact route by shape: the D × D covariance when D ≤ N, else the N × N Gram."""
    if route not in ROUTES:
        raise ConfigError("eigen.full_route", f"unknown full-matrix route '{route}'", f"use one of {', '.join(ROUTES)}")
    if route != "auto":
        return route
    return "covariance" if D <= N else "gram"


@dataclass(frozen=True)
class FullPlan:
    """How the full-matrix analysis of one store is cut into tasks, and what each one holds."""

    route: str  # covariance | gram | randomized
    N: int
    D: int
    L: int
    H: int
    split: int  # first sequence of half b
    chunk: int  # sequences per stored chunk: reads are aligned to it
    group: int  # heads per task
    panel_rows: int  # sequences held at once (covariance: per rank-m update; gram: the held panel)
    stream_rows: int  # gram: sequences streamed past the held panel per read
    workers: int  # tasks in flight
    rank: int | None = None
    D_eff: int = 0  # dimensions actually computed (row_centered blocks lose one per query row); 0: D

    @property
    def r(self) -> int:
        """Components stored for the whole sample."""
        r = min(self.N - 1, self.D)
        return r if self.rank is None else min(r, self.rank)

    @property
    def r_half(self) -> int:
        """Components stored per half (and of the held-out curve)."""
        r = min(min(self.split, self.N - self.split) - 1, self.D)
        return r if self.rank is None else min(r, self.rank)

    @property
    def d(self) -> int:
        return self.D_eff or self.D

    def state_bytes(self) -> int:
        """What one head's accumulators hold while its task streams the data."""
        if self.route == "covariance":
            return 2 * self.d * self.d * _F8
        if self.route == "gram":
            return self.N * self.N * _F8
        return 0

    def work_bytes(self) -> int:
        """Workspace of one head's eigenproblems (copies, eigenvectors, LAPACK work), measured in
        benchmarks/scale.py to stay below this."""
        if self.route == "covariance":
            return 6 * self.d * self.d * _F8
        if self.route == "gram":
            return 3 * self.N * self.N * _F8
        return 4 * (self.N + self.d) * max(self.rank or 1, 1) * _F8 * 4

    def task_bytes(self) -> int:
        rows = self.panel_rows + self.stream_rows if self.route != "randomized" else 0
        held = rows * self.group * self.d * (_F8 + 4)  # float64 vectors, and the float16/32 scores as read
        return self.group * self.state_bytes() + held + self.work_bytes()

    def peak_mb(self) -> int:
        return int(BASE_MB + self.workers * self.task_bytes() / 2**20)


def plan_full(
    N: int,
    D: int,
    L: int,
    H: int,
    split: int,
    chunk: int,
    memory_mb: float,
    workers: int = 1,
    route: str = "auto",
    *,
    rank: int | None,
    D_eff: int | None = None,
) -> FullPlan:
    """Cut the work into (layer, head group) tasks that fit ``memory_mb`` with ``workers`` in flight.

    Each task gets memory_mb / workers: up to half of it for its heads' accumulators (at least one
    head, whatever that costs) and the rest, at least one stored chunk, for the sequences it holds.
    """
    workers = max(int(workers), 1)
    chunk = max(int(chunk), 1)
    d = int(D_eff or D)
    if rank is not None:
        return FullPlan("randomized", N, D, L, H, split, chunk, 1, chunk, chunk, workers, int(rank), d)
    route = choose_route(N, d, route)
    budget = memory_mb * 2**20 / workers
    per_head = 2 * d * d * _F8 if route == "covariance" else N * N * _F8
    group = int(min(max(budget / 2 // per_head, 1), H))
    left = max(budget - group * per_head, 0)
    row_bytes = group * d * _F8

    def rows(share: float) -> int:
        m = int(left * share // row_bytes) // chunk * chunk
        return int(min(max(m, chunk), -(-N // chunk) * chunk))

    if route == "covariance":
        return FullPlan(route, N, D, L, H, split, chunk, group, rows(1.0), 0, workers, None, d)
    # Gram panels: only blocks on and above the diagonal are multiplied, so a held panel of at most
    # N/4 sequences spends 5/8 of the flops of one full product for 2.5 reads of the data
    quarter = max(-(-N // 4 // chunk) * chunk, chunk)
    return FullPlan(route, N, D, L, H, split, chunk, group, min(rows(0.5), quarter), rows(0.5), workers, None, d)


def full_memory_mb(
    shape, view: str, causal: bool, chunk: int, memory_mb: float, workers: int, route: str = "auto", *, rank: int | None
) -> int:
    """Peak RSS (MB) of the full-matrix analysis of a score store of ``shape`` (N, L, H, n, n):
    what the rule asks the scheduler for."""
    N, L, H, n = int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3])
    qs, ks = view_slices(view, n, causal)
    D = (qs.stop - qs.start) * (ks.stop - ks.start)
    return plan_full(N, D, L, H, N // 2, chunk, memory_mb, workers, route, rank=rank).peak_mb()


def store_layout(path) -> tuple[tuple[int, ...], int] | None:
    """(shape, sequences per inner chunk) of a score store from its metadata alone, or None before
    the store exists (for resource estimates while jobs are planned)."""
    meta = Path(path) / "scores" / "zarr.json"
    if not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    chunk = m["chunk_grid"]["configuration"]["chunk_shape"]
    for codec in m.get("codecs", []):
        if codec.get("name") == "sharding_indexed":
            chunk = codec["configuration"]["chunk_shape"]
    return tuple(int(x) for x in m["shape"]), int(chunk[0])


def stores_memory_mb(
    paths,
    view: str,
    causal: bool,
    memory_mb: float,
    workers: int,
    route: str = "auto",
    *,
    rank: int | None,
    guess_n_sequences: int = 1536,
    guess_seq_len: int = 128,
    guess_heads: int = 32,
) -> int:
    """:func:`full_memory_mb` of the concatenated shard stores at ``paths``; before they exist, of a
    generous guess (``guess_*``), so a job is never planned with too little."""
    layouts = [store_layout(p) for p in paths]
    if layouts and all(layouts):
        shape = (sum(s[0] for s, _ in layouts),) + layouts[0][0][1:]
        chunk = max(c for _, c in layouts)
    else:
        shape, chunk = (guess_n_sequences, 1, guess_heads, guess_seq_len, guess_seq_len), 8
    return full_memory_mb(shape, view, causal, chunk, memory_mb, workers, route, rank=rank)
