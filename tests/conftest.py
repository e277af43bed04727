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

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EIGENATTN_TEST_CACHE", REPO / ".test-cache"))
CONFIGS = [str(REPO / "config.yaml"), str(REPO / "tests" / "config.yaml")]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(workdir, *args, configs=CONFIGS, check=True, timeout=1800):
    """Run snakemake in ``workdir``: on the workdir's own checkout when it holds one (see
    :func:`copy_checkout`), else on this repository's Snakefile. Return the CompletedProcess."""
    snakefile = Path(workdir) / "Snakefile"
    snakefile = snakefile if snakefile.is_file() else REPO / "Snakefile"
    cmd = [*SNAKEMAKE, "-s", str(snakefile), "-d", str(workdir), "--configfile", *configs, *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


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
    for name in ("corpora", "wheels"):
        if (resources / name).exists():
            (res / name).symlink_to(resources / name, target_is_directory=True)
    for m in SHARED_MODELS:
        (res / "models" / m).symlink_to(resources / "models" / m, target_is_directory=True)
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
    run side by side on 2 cores: 188 s instead of 280 s for the same outputs."""
    wd = copy_checkout(make_workdir(tmp_path_factory.mktemp("tiny"), resources))
    proc = snakemake(wd, "-c2", "--max-threads", "1", "all")
    return wd, proc


@pytest.fixture(scope="session")
def minilm_dir(resources):
    return resources / "models" / "minilm"


@pytest.fixture(scope="session")
def smollm2_dir(resources):
    return resources / "models" / "smollm2"
