"""The README and docs/ name only files, modules and functions that exist, so a move or a rename
cannot leave them pointing at nothing."""

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("src", "workflow", "benchmarks", "tests", "notebooks", "envs", "profiles", "docs")
# A repository path, not the tail of another (logs/notebooks/... is an output, not notebooks/).
PATH = re.compile(r"(?<![\w/.~-])((?:" + "|".join(TOP) + r")/[\w./<>*{}-]*)")
# A library file named relative to src/ (the stale form `eigenattn/capture.py`).
LIBRARY_FILE = re.compile(r"(?<![\w/.-])(eigenattn/[\w/]+\.py)")
DOTTED = re.compile(r"(?<![\w./])(eigenattn(?:\.[A-Za-z_]\w*)+)")
TEST_NAME = re.compile(r"(?<![\w/.-])((?:tests|benchmarks|src|workflow)/[\w/.-]+\.py)::(\w+)")


def _written_outputs() -> list[str]:
    """Folders the workflow writes (git-ignored), which a clone does not have: benchmarks/out/."""
    lines = (REPO / ".gitignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if "/" in line.strip().rstrip("/")]


def _mentions(pattern: re.Pattern) -> list[tuple[str, int, tuple[str, ...]]]:
    out = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                out.append((doc.relative_to(REPO).as_posix(), n, m.groups()))
    return out


def _exists(path: str) -> bool:
    path = path.rstrip(".,;:")
    if any(path == out or path.startswith(out + "/") for out in _written_outputs()):
        return True
    if re.search(r"[<>*{}]", path):  # workflow/rules/<stage>.smk, notebooks/{name}.ipynb: a pattern
        return any(REPO.glob(re.sub(r"<[^>]*>|\{[^}]*\}", "*", path).rstrip("/")))
    return (REPO / path).exists()


def _defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _resolves(dotted: str) -> bool:
    """``eigenattn.capture.probe.STORED_PROB_TOL``: the longest prefix that is a module or package of
    src/, then a name that module defines."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = REPO / "src" / Path(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            return i == len(parts) or parts[i] in _defined_names(module)
    return False


def test_docs_find_paths():
    mentions = _mentions(PATH)
    assert len(mentions) > 50
    missing = [f"{doc}:{n}: {path}" for doc, n, (path,) in mentions if not _exists(path)]
    assert not missing, "named in the docs but absent:\n" + "\n".join(missing)


def test_docs_name_library_files_by_their_path():
    stale = [f"{doc}:{n}: {p}" for doc, n, (p,) in _mentions(LIBRARY_FILE) if not (REPO / "src" / p).is_file()]
    assert not stale, "library files that do not exist (write src/eigenattn/<package>/<module>.py):\n" + "\n".join(
        stale
    )


def test_docs_name_modules_and_functions_that_exist():
    dotted = [(doc, n, d.rstrip(".")) for doc, n, (d,) in _mentions(DOTTED)]
    assert len(dotted) > 10
    bad = [f"{doc}:{n}: {d}" for doc, n, d in dotted if not _resolves(d)]
    named = _mentions(TEST_NAME)
    bad += [f"{doc}:{n}: {p}::{name}" for doc, n, (p, name) in named if name not in _defined_names(REPO / p)]
    assert not bad, "named in the docs but not defined:\n" + "\n".join(bad)


def _readme_stages() -> dict[str, str]:
    """README's stage table: target rule -> stage number ('1' .. '8'; the unnumbered rows are left out)."""
    rows = re.findall(r"^\| (\d+) [^|]*\| `(\w+)` \|", (REPO / "README.md").read_text(), re.M)
    return {target: number for number, target in rows}


def test_readme_numbers_each_stage_one_way():
    """The stage table, the rule files' "# Stage N:" headers, the library listing and the packages'
    docstrings number the stages alike."""
    stages = _readme_stages()
    assert len(stages) >= 8, stages
    headers = {}
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        number = re.match(r"# Stage (\d+):", text)
        for rule in re.findall(r"^rule (\w+):", text, re.M):
            headers[rule] = number and number.group(1)
    wrong = {t: (n, headers.get(t)) for t, n in stages.items() if headers.get(t) != n}
    assert not wrong, f"README stage table vs the rule file's '# Stage N:' header: {wrong}"

    readme = (REPO / "README.md").read_text()
    listing = re.findall(r"^(\w+)(/|\.py) +(\d+)(?:-(\d+))?  ", readme, re.M)
    assert len(listing) >= 7, listing
    for package, kind, first, last in listing:
        numbers = set(map(str, range(int(first), int(last or first) + 1)))
        assert numbers <= set(stages.values()), f"README library listing: {package} is stage {numbers}"
        init = REPO / "src" / "eigenattn" / (package + ("/__init__.py" if kind == "/" else ".py"))
        said = re.match(r'"""Stages? (\d+)(?:-(\d+))?', init.read_text())
        if said:
            assert said.groups() == (first, last or None), f"{init.relative_to(REPO)} says {said.group(0)}"


@pytest.mark.parametrize(
    "text,ok",
    [
        ("see `src/eigenattn/config/config.schema.yaml`", True),
        ("see `src/eigenattn/config.schema.yaml`", False),
        ("`workflow/rules/<stage>.smk`", True),
        ("`workflow/rules/<stage>.snakefile`", False),
        ("outputs under `benchmarks/out/`", True),
        ("`logs/notebooks/{name}.log`", True),  # an output path, not notebooks/
    ],
)
def test_the_path_check_is_not_vacuous(text, ok):
    assert all(_exists(p) for p in PATH.findall(text)) is ok


def test_the_module_check_is_not_vacuous():
    assert _resolves("eigenattn.capture.probe.STORED_PROB_TOL")
    assert _resolves("eigenattn.config.settings")
    assert not _resolves("eigenattn.capture.probe.NO_SUCH_NAME")
    assert not _resolves("eigenattn.probe")
