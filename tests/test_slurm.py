"""A real single-node SLURM on localhost: the tiny workflow end to end through the SLURM executor
profile, and Dask workers started by dask-jobqueue. `.ci/run` starts SLURM (tests/slurm/slurm-up.sh)
before the tests; the fixture starts it too when run by hand as root."""

import os
import re
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import CONFIGS, REPO, make_workdir, snakemake

SLURM_FLAGS = [
    "--workflow-profile", str(REPO / "profiles" / "slurm"),
    # This test cluster has no accounting storage, so no sacct: query job status with squeue.
    "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2", "--slurm-no-account",
    # It is one node with 2 CPUs: shrink the profile's requests to fit it.
    "--default-resources", "mem_mb=2000", "runtime=30", "cpus_per_task=1", "gpu=0",
    "--set-resources", *[f"{r}:cpus_per_task=1" for r in ("fetch_model", "extract_scores", "eigen_rows",
                                                           "eigen_full", "overlap_within", "overlap_cross",
                                                           "plugin_eval_model", "train_run")],
    *[f"{r}:mem_mb=3000" for r in ("fetch_model", "extract_scores", "eigen_rows", "eigen_full")],
    "--set-threads", "extract_scores=1", "eigen_rows=1", "eigen_full=1", "plugin_eval_model=1",
    "-j", "4",
]


@pytest.fixture(scope="session")
def slurm():
    if os.environ.get("EIGENATTN_SLURM") == "0":
        pytest.skip("EIGENATTN_SLURM=0: SLURM tests explicitly disabled")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True) if shutil.which("scontrol") else None
    if ping is None or "is UP" not in ping.stdout:
        subprocess.run(["bash", str(REPO / "tests" / "slurm" / "slurm-up.sh")], check=True)
    return True


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
    small.write_text(yaml.safe_dump({"training": {"modes": ["scratch"], "variants": []},
                                     "eigen": {"variants": ["raw"], "views": ["prefix"]},
                                     "models": {"broken": broken}}))
    t = time.perf_counter()
    targets = ["eigen", "overlap", "reconstruct", "plugin_eval", "train", "resources/models/broken"]
    proc = snakemake(tmp_path, *SLURM_FLAGS, "--keep-going", "--retries", "0", *targets, timeout=1500,
                     configs=[*CONFIGS, str(small)], check=False)
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
    assert {"extract_scores", "eigen_rows", "eigen_full", "overlap_within", "overlap_cross", "reconstruct_view",
            "plugin_eval_model", "train_run"} <= set(remote), sorted(set(remote))
    print(f"tiny workflow under SLURM: {elapsed:.0f} s")

    # Same results as the local run.
    wd, _ = tiny_run
    # (the plug-in ran on 1 thread here and 2 locally: float32 sums may differ in the last bits)
    for rel, rtol in (("results/eigen/minilm/prefix/spectrum.csv", 1e-9), ("results/overlap/summary.csv", 1e-9),
                      ("results/reconstruction/smollm2/prefix.csv", 1e-6), ("results/plugin/smollm2.csv", 1e-4)):
        a, b = pd.read_csv(wd / rel), pd.read_csv(tmp_path / rel)
        if "variant" in a:  # the local run also has the row_centered variant
            a = a[a["variant"] == "raw"].reset_index(drop=True)
        if "view" in a and rel.endswith("summary.csv"):  # ... and the `all` view
            a = a[a["view"] == "prefix"].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, rtol=rtol, atol=1e-9)
    assert (tmp_path / "results" / "training" / "summary.csv").is_file()


def test_dask_on_slurm_equals_threads(slurm, tmp_path):
    from eigenattn.spectra.rows import row_spectrum
    from eigenattn.spectra.scheduler import dask_scheduler
    from eigenattn.storage.store import open_scores
    from synthetic import low_rank_scores, write_store

    shards = [write_store(tmp_path / "s.zarr", low_rank_scores(24, 2, 3, 16, seed=5), batch=4)]
    with dask_scheduler("threads", 2):
        a = row_spectrum(open_scores(shards)[0], "all", "raw", False, 8)
    opts = {"cores": 1, "memory": "1GB", "jobs": 1, "interface": "lo", "walltime": "00:10:00",
            "log_directory": str(tmp_path / "dask-logs"), "local_directory": str(tmp_path)}
    t = time.perf_counter()
    with dask_scheduler("slurm", 1, opts):
        b = row_spectrum(open_scores(shards)[0], "all", "raw", False, 8)
    print(f"dask-on-SLURM row spectrum (worker start included): {time.perf_counter() - t:.1f} s")
    np.testing.assert_allclose(a["heads"]["eigenvalues"], b["heads"]["eigenvalues"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a["pooled"]["eigenvectors"], b["pooled"]["eigenvectors"], rtol=1e-10, atol=1e-12)
