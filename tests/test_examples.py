"""The scripts under examples/ run as their docstrings say, on a finished tiny run."""

import math
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.workflow
def test_apply_plan_example_on_the_tiny_run(tiny_run):
    """examples/apply_plan.py applies the tiny run's cheapest smollm2 plan: the planned perplexity
    differs from the plain model's, and removing the plan gives the plain model's back."""
    wd, _ = tiny_run
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "apply_plan.py"), "--passages", "2"],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "2 held-out passages of exactly 32 tokens" in out, out
    found = dict(re.findall(r"perplexity (of the plain model|with the plan|after detach):\s+([0-9.]+)", out))
    plain, planned, again = (float(found[k]) for k in ("of the plain model", "with the plan", "after detach"))
    assert all(math.isfinite(x) and x > 1 for x in (plain, planned, again)), out
    assert planned != pytest.approx(plain, rel=1e-6), out  # the plan approximates some heads
    assert again == pytest.approx(plain, rel=1e-5), out
