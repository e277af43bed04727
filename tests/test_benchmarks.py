"""Every script in benchmarks/ still runs: its --help, and its --smoke mode (tiny sizes, every step
once, seconds), so a benchmark cannot rot unseen between the rounds that measure with it."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

# Each smoke run starts a process and imports torch (about 100 s for all of them): the full suite's tier.
pytestmark = pytest.mark.slow

BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
# What each smoke run prints last, once every step has run.
FINAL_LINE = {
    "eigen": "peak RSS of b = ",
    "extraction": "n=256: c/a = ",
    "import_cost": "sum over scripts",
    "kernels": "MACs vs clock: ",
    "partial_attention": "  128  16 | ",
    "plans_speed": "plans speed: n = 256, 1 thread(s): end-to-end ",
    "scale": "projection: n = 512",
    "streamed": "   64 | ",
}


def _run(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_every_benchmark_has_a_smoke_check():
    assert sorted(FINAL_LINE) == BENCHMARKS, "add the new benchmark's last smoke line to FINAL_LINE"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_help_and_smoke_run(name, tmp_path, request):
    assert "--smoke" in _run(name, "--help", cwd=tmp_path).stdout
    args = ["--smoke"]
    if name in ("extraction", "streamed", "plans_speed"):
        # extraction: n = 256, where minilm's float16 scores fail the equivalence probe: the benchmark
        # must store what the pipeline would (extraction.dtype auto), not insist on float16.
        resources = request.getfixturevalue("resources")
        args += ["--model-dir", str(resources / "models" / ("minilm" if name == "extraction" else "smollm2"))]
        args += ["--documents", str(resources / "corpora" / "enwiki-sample" / "documents.parquet")]
    out = _run(name, *args, cwd=tmp_path).stdout
    assert FINAL_LINE[name] in out, out[-3000:]
    assert not list(tmp_path.iterdir()), "a smoke run leaves nothing behind"
