"""Independent pieces of a reconstruction job run side by side in threads (layers of the held-out
evaluation, methods of the plug-in). torch, numpy and scipy release the GIL in their kernels, so
threads use the job's cores without copying the inputs into processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def one_thread_per_worker(workers: int):
    """With ``workers`` > 1: one BLAS thread and one torch thread per computation while it lasts.

    Side-by-side workers then do not oversubscribe the cores (two OpenMP teams on two busy cores
    spin at their barriers), and each worker's floating-point reductions run as in a
    single-threaded job (Snakemake sets a job's BLAS and OpenMP threads to the rule's threads)."""
    if workers <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def map_in_threads(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``fn`` over ``items`` in ``workers`` threads, one BLAS and torch thread each; results in the
    order of ``items`` (so a table built from them does not depend on ``workers``)."""
    items = list(items)
    workers = max(1, min(int(workers), len(items)))
    if workers == 1:
        yield from map(fn, items)
        return
    with one_thread_per_worker(workers), ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, items)
