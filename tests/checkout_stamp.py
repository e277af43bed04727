"""The commit of a checkout and a hash of its uncommitted changes: what ran a tiny run.

    python tests/checkout_stamp.py > results/.tiny-run-stamp      # .ci/run, after its tiny run

The suite's tiny-run fixture (conftest.py) reuses that run only when the stamp matches the
checkout it tests. Standard library only: it runs in the user's venv, which has no pytest.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout_stamp(repo: Path = REPO) -> str:
    """``<commit> <sha256 of the diff against it and of every untracked, not ignored file>``."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True).stdout

    h = hashlib.sha256(git("diff", "HEAD"))
    for f in git("ls-files", "--others", "--exclude-standard").decode().splitlines():
        h.update(f.encode() + b"\0" + (repo / f).read_bytes())
    return f"{git('rev-parse', 'HEAD').decode().strip()} {h.hexdigest()}"


if __name__ == "__main__":
    print(checkout_stamp())
