"""Every third-party module the pipeline imports comes from a runtime dependency.

The test extras (scikit-learn, xarray, pytest, ...) are installed wherever this test runs, so an
import that works here proves nothing about a user's `pip install -e .`. Instead this test reads
the imports themselves (top-level and inside functions) from `src/`, `workflow/` (scripts, rules,
the Snakefile), the notebooks and examples/, maps each module to the distribution that provides it, and
checks that distribution against the closure of `[project].dependencies` in pyproject.toml
(each runtime pin, the extras it names, and what those require in turn), never the test extra.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

FIRST_PARTY = {"eigenattn"}
# Lines of Snakemake's own syntax (rules, directives) cannot be parsed by `ast`; their imports are
# plain Python statements at the start of a line.
_SMK_IMPORT = re.compile(r"^\s*(?:from\s+([A-Za-z_][\w.]*)\s+import\b|import\s+([A-Za-z_][\w.,\s]*))")


def _python_imports(source: str, where: str) -> set[str]:
    """Top-level module names of every absolute import in ``source``, at any depth."""
    tree = ast.parse(source, filename=where)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _smk_imports(source: str) -> set[str]:
    found = set()
    for line in source.splitlines():
        m = _SMK_IMPORT.match(line)
        if not m:
            continue
        if m.group(1):
            found.add(m.group(1).split(".")[0])
        else:
            found.update(part.strip().split(" ")[0].split(".")[0] for part in m.group(2).split(",") if part.strip())
    return found


def _notebook_imports(path: Path) -> set[str]:
    nb = json.loads(path.read_text())
    found = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        # IPython magics and shell escapes are not Python.
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        found |= _python_imports(src, str(path))
    return found


def pipeline_imports(root: Path = REPO) -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over the code a pipeline run executes."""
    uses: dict[str, set[str]] = {}

    def add(mods, f):
        for m in mods:
            uses.setdefault(m, set()).add(str(f.relative_to(root)))

    for f in sorted(
        [*(root / "src").rglob("*.py"), *(root / "workflow").rglob("*.py"), *(root / "examples").rglob("*.py")]
    ):
        add(_python_imports(f.read_text(), str(f)), f)
    for f in sorted([root / "Snakefile", *(root / "workflow").rglob("*.smk")]):
        add(_smk_imports(f.read_text()), f)
    for f in sorted((root / "workflow" / "rules" / "inputs").glob("*")):
        if f.is_file():
            add(_smk_imports(f.read_text()), f)
    for f in sorted((root / "notebooks").glob("*.ipynb")):
        add(_notebook_imports(f), f)
    return uses


def runtime_closure(requirements: list[str]) -> set[str]:
    """Canonical names of the distributions ``requirements`` pull in, transitively, as installed
    here (markers evaluated for this interpreter, extras followed only where asked for)."""
    env = default_environment()
    seen: set[tuple[str, frozenset]] = set()
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (a marker excluded it upstream): nothing to follow
        for spec in requires:
            sub = Requirement(spec)
            if sub.marker is None or any(
                sub.marker.evaluate({**env, "extra": extra}) for extra in (req.extras or {""})
            ):
                todo.append(sub)
    return names


def module_distributions() -> dict[str, set[str]]:
    return {mod: {canonicalize_name(d) for d in dists} for mod, dists in metadata.packages_distributions().items()}


def undeclared(uses: dict[str, set[str]], runtime: set[str], mod_to_dist: dict[str, set[str]]) -> dict[str, str]:
    """{module: why} for every imported module that no runtime dependency provides."""
    bad = {}
    for mod, files in sorted(uses.items()):
        if mod in FIRST_PARTY or mod in sys.stdlib_module_names or mod == "__future__":
            continue
        dists = mod_to_dist.get(mod)
        where = ", ".join(sorted(files))
        if not dists:
            bad[mod] = f"no installed distribution provides it (imported in {where})"
        elif not dists & runtime:
            bad[mod] = (
                f"provided by {sorted(dists)}, which is not a runtime dependency "
                f"(imported in {where}); add it to [project].dependencies and envs/*.yaml"
            )
    return bad


def _runtime_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_pipeline_imports_come_from_runtime_dependencies():
    bad = undeclared(pipeline_imports(), runtime_closure(_runtime_requirements()), module_distributions())
    assert not bad, "\n".join(f"{m}: {why}" for m, why in bad.items())


def test_direct_imports_are_declared_directly():
    """A module the pipeline imports by name is pinned by name: a transitive dependency may
    disappear in the next release of whatever pulls it in."""
    direct = {canonicalize_name(Requirement(r).name) for r in _runtime_requirements()}
    bad = undeclared(pipeline_imports(), direct, module_distributions())
    assert not bad, "\n".join(f"{m}: {why}" for m, why in bad.items())


def test_scanner_finds_imports_inside_functions_and_notebooks(tmp_path):
    """The scanner itself, on a tree whose only test-only import sits inside a function: the
    check reports it, and it is satisfied once the distribution is declared."""
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "m.py").write_text("import numpy\n\ndef f():\n    from sklearn import svm\n")
    (tmp_path / "workflow" / "rules").mkdir(parents=True)
    (tmp_path / "workflow" / "rules" / "a.smk").write_text('from pandas import DataFrame\nrule a:\n    shell: "x"\n')
    (tmp_path / "Snakefile").write_text("import os, yaml\n")
    (tmp_path / "notebooks").mkdir()
    nb = {"cells": [{"cell_type": "code", "source": ["%matplotlib inline\n", "import scipy.stats\n"]}]}
    (tmp_path / "notebooks" / "n.ipynb").write_text(json.dumps(nb))
    uses = pipeline_imports(tmp_path)
    assert {"numpy", "sklearn", "pandas", "os", "yaml", "scipy"} <= set(uses)
    mod_to_dist = {"numpy": {"numpy"}, "sklearn": {"scikit-learn"}, "pandas": {"pandas"}, "yaml": {"pyyaml"}}
    mod_to_dist["scipy"] = {"scipy"}
    bad = undeclared(uses, {"numpy", "pandas", "pyyaml", "scipy"}, mod_to_dist)
    assert set(bad) == {"sklearn"} and "src/pkg/m.py" in bad["sklearn"]
    assert not undeclared(uses, {"numpy", "pandas", "pyyaml", "scipy", "scikit-learn"}, mod_to_dist)
