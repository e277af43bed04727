"""A real single-node SLURM on localhost: the tiny workflow end to end through the SLURM executor
profile, and Dask workers started by dask-jobqueue. `.ci/run` starts SLURM (tests/slurm/slurm-up.sh)
before the tests and stops it afterwards; run by hand as root, the session fixture starts it when it
is not up, and at the end of the session stops the daemons it started (and only those)."""

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import CONFIGS, FLOAT32, REPO, make_workdir, snakemake

SLURM_FLAGS = [
    "--workflow-profile",
    str(REPO / "profiles" / "slurm"),
    # This test cluster has no accounting storage, so no sacct: query job status with squeue.
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--slurm-no-account",
    # It is one node with 2 CPUs: shrink the profile's requests to fit it.
    "--default-resources",
    "mem_mb=2000",
    "runtime=30",
    "cpus_per_task=1",
    "gpu=0",
    "--set-resources",
    *[
        f"{r}:cpus_per_task=1"
        for r in (
            "fetch_model",
            "extract_scores",
            "eigen_rows",
            "eigen_full",
            "overlap_within",
            "overlap_cross",
            "reconstruct_view",
            "plugin_eval_model",
            "train_run",
        )
    ],
    *[
        f"{r}:mem_mb=3000"
        for r in ("fetch_model", "extract_scores", "eigen_rows", "eigen_full", "stream_moments", "extract_tokens")
    ],
    "--set-threads",
    "extract_scores=1",
    "eigen_rows=1",
    "eigen_full=1",
    "reconstruct_view=1",
    "plugin_eval_model=1",
    "-j",
    "4",
]


DAEMONS = ("munged", "slurmctld", "slurmd")


def running_daemons() -> set[str]:
    """The SLURM daemons alive now; a zombie (what a stopped daemon can leave) does not count."""
    alive = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        name, state = text[text.find("(") + 1 : text.rfind(")")], text[text.rfind(")") + 2 :][:1]
        if name in DAEMONS and state != "Z":
            alive.add(name)
    return alive


def slurm_is_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    return "is UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout


@contextmanager
def session_slurm(is_up, running, start, stop):
    """SLURM for one test session. A SLURM that is already up (as .ci/run starts it) is used and left
    running. Otherwise ``start()`` it, and at the end ``stop(names)`` the daemons that were not
    running before it, also when starting fails half-way; daemons that were already running (a
    system munged, say) are never stopped. Yields the set of daemons this session started."""
    if is_up():
        yield set()
        return
    before = running()
    try:
        start()
    except BaseException:
        if running() - before:
            stop(sorted(running() - before))
        raise
    started = running() - before
    try:
        yield started
    finally:
        if started:
            stop(sorted(started))


@pytest.fixture(scope="session")
def slurm():
    if os.environ.get("EIGENATTN_SLURM") == "0":
        pytest.skip("EIGENATTN_SLURM=0: SLURM tests explicitly disabled")
    scripts = REPO / "tests" / "slurm"
    with session_slurm(
        slurm_is_up,
        running_daemons,
        start=lambda: subprocess.run(["bash", str(scripts / "slurm-up.sh")], check=True),
        stop=lambda names: subprocess.run(["bash", str(scripts / "slurm-down.sh"), *names]),
    ) as started:
        yield started


class FakeHost:
    """Stands in for the process table and the two scripts in the bookkeeping tests."""

    def __init__(self, up=False, running=(), starts=DAEMONS, fail_after=None):
        self.up, self.alive, self.starts, self.fail_after = up, set(running), starts, fail_after
        self.calls = []

    def start(self):
        self.calls.append("start")
        for i, name in enumerate(self.starts):
            if i == self.fail_after:
                raise subprocess.CalledProcessError(1, "slurm-up.sh")
            self.alive.add(name)

    def stop(self, names):
        self.calls.append(("stop", tuple(names)))
        self.alive -= set(names)

    def session(self):
        return session_slurm(lambda: self.up, lambda: set(self.alive), self.start, self.stop)


def test_slurm_already_up_is_used_and_left_running():
    host = FakeHost(up=True, running=DAEMONS)
    with host.session() as started:
        assert started == set()
    assert host.calls == [] and host.alive == set(DAEMONS)


def test_slurm_started_by_the_session_is_stopped_at_its_end():
    host = FakeHost()
    with pytest.raises(RuntimeError), host.session() as started:  # a failing test body stops it too
        assert started == set(DAEMONS) and host.alive == set(DAEMONS)
        raise RuntimeError
    assert host.calls == ["start", ("stop", ("munged", "slurmctld", "slurmd"))] and host.alive == set()


def test_only_the_daemons_the_session_started_are_stopped():
    host = FakeHost(running={"munged"})  # a system munged, no SLURM
    with host.session() as started:
        assert started == {"slurmctld", "slurmd"}
    assert host.calls == ["start", ("stop", ("slurmctld", "slurmd"))] and host.alive == {"munged"}


def test_a_start_that_fails_half_way_stops_what_it_started():
    host = FakeHost(fail_after=1)  # munged came up, slurmctld did not
    with pytest.raises(subprocess.CalledProcessError), host.session():
        pass
    assert host.calls == ["start", ("stop", ("munged",))] and host.alive == set()


def test_tiny_workflow_end_to_end_under_slurm(slurm, tmp_path, resources, tiny_run):
    """Every computing stage, corpus to training, each job its own SLURM job, and one job that fails
    inside SLURM (a model whose checksum is wrong): with --keep-going the run ends with an error
    naming that job, and every other job completes. To keep CI short the training grid is cut to
    exact (two seeds), the analysis to the raw variant and the prefix view, and the notebooks (which
    only read these outputs) are left to the local tiny run, which also covers the two-stage
    training DAG."""
    make_workdir(tmp_path, resources)
    broken = dict(yaml.safe_load((REPO / "config.yaml").read_text())["models"]["minilm"])
    broken["sha256"] = {**broken["sha256"], "config.json": "0" * 64}
    small = tmp_path / "slurm.yaml"
    small.write_text(
        yaml.safe_dump(
            {
                "training": {"modes": ["scratch"], "variants": []},
                "eigen": {"variants": ["raw"], "views": ["prefix"]},
                "models": {"broken": broken},
            }
        )
    )
    t = time.perf_counter()
    targets = ["eigen", "overlap", "reconstruct", "plugin_eval", "train", "resources/models/broken"]
    proc = snakemake(
        tmp_path,
        *SLURM_FLAGS,
        "--keep-going",
        "--retries",
        "0",
        *targets,
        timeout=1500,
        configs=[*CONFIGS, str(small)],
        check=False,
    )
    elapsed = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    # the failing job ends the run with an error that names it, and leaves no output behind
    assert proc.returncode != 0, out[-3000:]
    assert re.search(r"Error in rule fetch_model:[^\n]*\n(.*\n){0,8}.*resources/models/broken", out), out[-3000:]
    assert not (tmp_path / "resources" / "models" / "broken").exists()
    submitted = set(re.findall(r"has been submitted with SLURM jobid (\d+)", out))
    # every job except the target rules (local) ran as its own SLURM job (the failed job's own log,
    # which Snakemake prints between rules of '=', is left out of the count)
    own = re.sub(r"^={40,}\n.*?^={40,}\n", "", out, flags=re.M | re.S)
    remote = re.findall(r"^rule (\w+):", own, flags=re.M)
    assert len(submitted) == len(remote) >= 20, out[-3000:]
    assert {
        "extract_scores",
        "eigen_rows",
        "eigen_full",
        "overlap_within",
        "overlap_cross",
        "reconstruct_view",
        "plugin_eval_model",
        "train_run",
    } <= set(remote), sorted(set(remote))
    print(f"tiny workflow under SLURM: {elapsed:.0f} s")

    # Same results as the local run.
    wd, _ = tiny_run
    # (the plug-in ran on 1 thread here and 2 locally: float32 sums may differ in the last bits)
    for rel, rtol in (
        ("results/eigen/minilm/prefix/spectrum.csv", 1e-9),
        ("results/overlap/summary.csv", 1e-9),
        ("results/reconstruction/smollm2/prefix.csv", 1e-6),
        ("results/plugin/smollm2.csv", 1e-4),
    ):
        a, b = pd.read_csv(wd / rel), pd.read_csv(tmp_path / rel)
        if "variant" in a:  # the local run also has the row_centered variant
            a = a[a["variant"] == "raw"].reset_index(drop=True)
        if "view" in a and rel.endswith("summary.csv"):  # ... and the `all` view
            a = a[a["view"] == "prefix"].reset_index(drop=True)
        if "estimator" in a:  # nystrom's exact pseudo-inverse of an ill-conditioned kernel amplifies
            # the last bits of float arithmetic (its P̂ reaches |10²|), so it is compared by its rows only
            ill = (a.estimator == "nystrom") & (a.strategy == "exact")
            assert ill.sum() > 0 and ill.sum() == ((b.estimator == "nystrom") & (b.strategy == "exact")).sum()
            a, b = a[~ill].reset_index(drop=True), b[~ill.to_numpy()].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, rtol=rtol, atol=1e-9)
    assert (tmp_path / "results" / "training" / "summary.csv").is_file()


def test_streamed_tiny_workflow_under_slurm(slurm, tmp_path, resources, routes):
    """Streamed mode (extraction.store: stream) through the SLURM profile: each layer group's
    moments, each token store, the row spectra from the merged moments and the reconstruction from
    recomputed scores are SLURM jobs, and give the local streamed run's tables."""
    make_workdir(tmp_path, resources)
    cfg = tmp_path / "streamed.yaml"
    cfg.write_text(yaml.safe_dump({**FLOAT32, "extraction": {"dtype": "float32", "store": "stream"}}))
    targets = ["results/eigen/smollm2/prefix/spectrum.csv", "results/reconstruction/smollm2/prefix.csv"]
    proc = snakemake(tmp_path, *SLURM_FLAGS, *targets, timeout=1200, configs=[*CONFIGS, str(cfg)])
    out = proc.stdout + proc.stderr
    remote = set(re.findall(r"^rule (\w+):", out, flags=re.M))
    assert {"stream_moments", "extract_tokens", "eigen_rows", "reconstruct_view"} <= remote, sorted(remote)
    assert not (tmp_path / "results" / "scores" / "smollm2").exists()
    wd, _, _ = routes
    for rel, rtol in (("eigen/smollm2/prefix/spectrum.csv", 1e-9), ("reconstruction/smollm2/prefix.csv", 1e-6)):
        a, b = pd.read_csv(wd / "results" / rel), pd.read_csv(tmp_path / "results" / rel)
        if "estimator" in a:
            ill = (a.estimator == "nystrom") & (a.strategy == "exact")
            a, b = a[~ill].reset_index(drop=True), b[~ill.to_numpy()].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, rtol=rtol, atol=1e-9)


def test_dask_on_slurm_equals_threads(slurm, tmp_path):
    from eigenattn.spectra.rows import row_spectrum
    from eigenattn.spectra.scheduler import dask_scheduler
    from eigenattn.storage.store import open_scores
    from synthetic import low_rank_scores, write_store

    shards = [write_store(tmp_path / "s.zarr", low_rank_scores(24, 2, 3, 16, seed=5), batch=4)]
    with dask_scheduler("threads", 2):
        a = row_spectrum(open_scores(shards)[0], "all", "raw", False, 8)
    opts = {
        "cores": 1,
        "memory": "1GB",
        "jobs": 1,
        "interface": "lo",
        "walltime": "00:10:00",
        "log_directory": str(tmp_path / "dask-logs"),
        "local_directory": str(tmp_path),
    }
    t = time.perf_counter()
    with dask_scheduler("slurm", 1, opts):
        b = row_spectrum(open_scores(shards)[0], "all", "raw", False, 8)
    print(f"dask-on-SLURM row spectrum (worker start included): {time.perf_counter() - t:.1f} s")
    np.testing.assert_allclose(a["heads"]["eigenvalues"], b["heads"]["eigenvalues"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a["pooled"]["eigenvectors"], b["pooled"]["eigenvectors"], rtol=1e-10, atol=1e-12)
