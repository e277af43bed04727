"""The workflow's jobs running on this machine, so that a job can take the cores nobody else uses.

Snakemake gives each job a fixed thread count; on a small machine the default is one thread for
the jobs that could split their work (``job_threads``), because the DAG is wide and whole jobs side
by side use the cores better. A job re-run on its own (one stage after a change, the usual way a
researcher works) then leaves the other cores idle. Each job script registers itself here
(:func:`register`: one file per process under ``.snakemake/eigenattn-running/`` of the working
directory, holding its thread count, removed when it exits); :func:`free_threads` gives a job the
cores of the local run (``--cores``) that no running job holds, never fewer than its own threads.
Only local runs count: under a cluster executor every job has its node's share and this returns
the job's own threads. A job that took the free cores keeps them until it ends: a job Snakemake
starts later may then share a core with it for a while.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path

REGISTRY = Path(".snakemake") / "eigenattn-running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register(threads: int, registry: Path = REGISTRY) -> Path | None:
    """Record this process as a running job holding ``threads`` cores (removed at exit)."""
    try:
        registry.mkdir(parents=True, exist_ok=True)
        entry = registry / f"{socket.gethostname()}-{os.getpid()}.json"
        tmp = entry.with_suffix(".tmp")  # written whole, then renamed: a reader never sees half of it
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "threads": int(threads)}))
        tmp.replace(entry)
    except OSError:  # a read-only working directory: the job keeps its own threads
        return None
    atexit.register(lambda: entry.unlink(missing_ok=True))
    return entry


def held_by_others(registry: Path = REGISTRY) -> int:
    """Threads held by the other live jobs on this host (stale entries of dead processes are removed)."""
    total, host = 0, socket.gethostname()
    if not registry.is_dir():
        return 0
    for f in registry.glob("*.json"):
        try:
            e = json.loads(f.read_text())
            pid, threads = int(e["pid"]), int(e.get("threads", 1))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if e.get("host") != host or pid == os.getpid():
            continue
        if not _alive(pid):
            f.unlink(missing_ok=True)
            continue
        total += threads
    return total


def free_threads(own: int, cores: int | None, registry: Path = REGISTRY) -> int:
    """The threads a job may use now: the local run's ``cores`` less those the other running jobs
    hold, and at least ``own`` (``cores`` None, a cluster executor: ``own``). What it takes is
    written to its registry entry, so a job starting after it sees those cores held."""
    own = max(int(own), 1)
    if not cores:
        return own
    taken = max(own, int(cores) - held_by_others(registry))
    if taken != own:
        register(taken, registry)
    return taken
