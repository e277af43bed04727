"""Threads where they are free (storage/running.py): a job alone takes the local run's free cores."""

import json
import os
import socket
import subprocess
import sys

from eigenattn.config.settings import Runtime
from eigenattn.storage import running


def _entry(registry, pid, threads, host=None):
    registry.mkdir(parents=True, exist_ok=True)
    host = host or socket.gethostname()
    (registry / f"{host}-{pid}.json").write_text(json.dumps({"pid": pid, "host": host, "threads": threads}))


def test_a_job_alone_takes_every_core_and_beside_others_its_own(tmp_path):
    reg = tmp_path / "running"
    assert running.free_threads(1, 2, reg) == 2  # nothing else runs
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _entry(reg, sleeper.pid, 1)
        assert running.free_threads(1, 2, reg) == 1  # one core held by a live job
        assert running.free_threads(1, 8, reg) == 7
        _entry(reg, sleeper.pid + 10**6, 4)  # a dead process: its stale entry is swept
        _entry(reg, 1, 4, host="another-node")  # another host's job shares no core with this one
        assert running.free_threads(1, 8, reg) == 7
        assert not (reg / f"{socket.gethostname()}-{sleeper.pid + 10**6}.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert running.free_threads(1, 2, reg) == 2  # it ended
    mine = reg / f"{socket.gethostname()}-{os.getpid()}.json"
    assert json.loads(mine.read_text())["threads"] == 2  # what it took is what others see
    (reg / "broken.json").write_text('{"host": "%s"}' % socket.gethostname())  # no pid: skipped
    assert running.held_by_others(reg) == 0
    assert running.free_threads(3, None, reg) == 3  # a cluster executor: its own threads
    assert running.free_threads(3, 2, reg) == 3  # never fewer than its own


def test_register_writes_this_process_and_runtime_asks_only_locally(tmp_path, monkeypatch):
    reg = tmp_path / "running"
    entry = running.register(2, reg)
    assert json.loads(entry.read_text()) == {"pid": os.getpid(), "host": socket.gethostname(), "threads": 2}
    assert running.held_by_others(reg) == 0  # itself is not "another job"
    monkeypatch.chdir(tmp_path)
    assert Runtime(cores=2).threads_now(1) == 2
    assert Runtime(cores=None).threads_now(1) == 1
    assert Runtime(cores=2, scheduler="slurm").threads_now(1) == 1
