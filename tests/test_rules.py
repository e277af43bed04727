"""Every rule says what it does: `snakemake --list-rules` shows a one-line description beside each
rule name (its docstring), so a user can pick a target without reading the rule files."""

import re
import subprocess

from conftest import REPO, SNAKEMAKE, snakemake_env


def test_every_rule_has_a_description():
    proc = subprocess.run(
        [*SNAKEMAKE, "--list-rules"], cwd=REPO, capture_output=True, text=True, timeout=300, env=snakemake_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = dict(
        re.fullmatch(r"(\w+)(?: \((.+)\))?", line).groups()
        for line in proc.stdout.splitlines()
        if re.fullmatch(r"\w+(?: \(.+\))?", line)
    )
    defined = set()
    for smk in [REPO / "Snakefile", *(REPO / "workflow" / "rules").rglob("*.smk")]:
        defined |= set(re.findall(r"^(?:use )?rule (\w+)(?: as (\w+))?", smk.read_text(), re.M))
    defined = {alias or name for name, alias in defined}
    assert defined and defined == set(listed), defined ^ set(listed)
    bare = sorted(name for name, doc in listed.items() if not doc)
    assert not bare, f"rules without a docstring: {bare}"
    # A `use rule ... as` copy says what it does itself, not what the rule it reuses does.
    repeated = {doc for doc in listed.values() if list(listed.values()).count(doc) > 1}
    assert not repeated, repeated
