"""Logging set-up shared by the workflow scripts."""

from __future__ import annotations

import logging
import os
import sys


def start(snakemake) -> logging.Logger:
    """Send stderr (tracebacks, tqdm bars, warnings) to the rule's log file and cap threads."""
    if snakemake.log:
        sys.stderr = open(snakemake.log[0], "w", buffering=1)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    threads = max(int(getattr(snakemake, "threads", 1) or 1), 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch = sys.modules.get("torch")  # only where the job's own imports brought it in: 4-5 s saved elsewhere
    if torch is not None:
        torch.set_num_threads(threads)
    log = logging.getLogger("eigenattn")
    log.info("rule %s, threads %d", getattr(snakemake, "rule", "?"), threads)
    from eigenattn.storage.running import register

    register(threads)  # so that a job running alone can see the cores nobody holds (running.py)
    return log
