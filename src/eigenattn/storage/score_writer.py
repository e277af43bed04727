"""Writing score blocks to Zarr on a background thread while the model computes the next batch."""

from __future__ import annotations

import ctypes
import ctypes.util
import queue
import threading

import torch


class ScoreWriter:
    """Writes score blocks to Zarr on a background thread while the next batch is computed.

    ``slots`` preallocated host buffers rotate between the model loop (fills one) and the
    writer (drains the others). On CUDA they are pinned, so device-to-host copies are
    non-blocking; the writer waits on each block's CUDA event before reading it. (A writer
    process was measured slower here: the extra copy through shared memory cost more than the
    GIL contention it avoids.)
    """

    def __init__(self, array, block_shape, dtype: torch.dtype, slots: int = 3, pin: bool = False):
        self.array = array
        self.bufs = [torch.empty(block_shape, dtype=dtype, pin_memory=pin) for _ in range(slots)]
        self.free: queue.Queue = queue.Queue()
        for i in range(slots):
            self.free.put(i)
        self.todo: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="zarr-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (job := self.todo.get()) is not None:
            slot, start, count, ready = job
            try:
                if self.error is None:
                    if ready is not None:
                        ready.synchronize()
                    self.array[start : start + count] = self.bufs[slot][:count].numpy()
            except BaseException as e:  # re-raised in the model loop
                self.error = e
            finally:
                self.free.put(slot)

    def acquire(self) -> tuple[int, torch.Tensor]:
        slot = self.free.get()
        if self.error is not None:
            raise self.error
        return slot, self.bufs[slot]

    def submit(self, slot: int, start: int, count: int, ready=None):
        self.todo.put((slot, start, count, ready))

    def close(self):
        self.todo.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def reuse_freed_memory(limit_mb: int = 32) -> bool:
    """Ask glibc to keep freed blocks up to ``limit_mb`` in the heap instead of returning them to
    the system. Extraction allocates the same score-sized tensors for every layer and batch; by
    default glibc maps each afresh, and the kernel then zeroes and faults in every page again
    (measured: most of the system time of extraction on a VM). Returns False where this is not
    glibc (the call is then a no-op)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, limit_mb << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
