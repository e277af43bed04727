"""The typed settings of the stages: ``from_config`` is the only code that names a key of the eigen,
overlap and scaling sections, the rules' params keep their recorded values (no output re-runs), and
the config layer's modules import one another without a cycle."""

import ast
import re

import yaml

from conftest import REPO
from eigenattn.config import plan, settings
from eigenattn.config.validation import check, validate

SRC = REPO / "src" / "eigenattn"
SECTIONS = ("eigen", "overlap", "scaling")


def _tiny() -> dict:
    """config.yaml with tests/config.yaml over it, as Snakemake merges them."""
    from snakemake.utils import update_config

    c = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(c, yaml.safe_load((REPO / "tests" / "config.yaml").read_text()))
    c = validate(c)
    check(c)
    return c


def _section_reads(tree) -> list[tuple[int, str]]:
    """(line, enclosing function) of every ``config["eigen"]``-like read (also ``.get("eigen")``)."""
    found = []

    def visit(node, func):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "config":
            key = node.slice.value if isinstance(node.slice, ast.Constant) else None
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "config"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            key = node.args[0].value
        if key in SECTIONS:
            found.append((node.lineno, func))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, None)
    return found


def test_only_from_config_names_the_keys_of_the_stage_sections():
    bad = []
    for path in [*SRC.rglob("*.py"), *(REPO / "workflow" / "scripts").glob("*.py")]:
        reads = _section_reads(ast.parse(path.read_text()))
        bad += [f"{path.relative_to(REPO)}:{line} ({func})" for line, func in reads if func != "from_config"]
    pattern = re.compile(r"""config(\[\s*|\.get\(\s*)["'](eigen|overlap|scaling)["']""")
    for path in (REPO / "workflow").rglob("*.smk"):
        bad += [
            f"{path.relative_to(REPO)}:{i}"
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if pattern.search(line)
        ]
    assert not bad, f"config sections read outside a settings class's from_config: {bad}"


def test_stage_params_keep_their_recorded_values():
    """The params the rules passed before the settings classes (Snakemake records each param's repr,
    so a changed type or key order would re-run every output)."""
    c = _tiny()
    assert repr(settings.Spectrum.from_config(c).params()) == repr({"report_k": c["eigen"]["report_k"]})
    assert repr(settings.SubspaceOverlap.from_config(c, "raw").params()) == repr(
        {"k": c["overlap"]["k"], "variant": "raw"}
    )
    points = plan.scaling_points(c, "minilm")["all"]
    old = {
        "n": [n for n, _ in points],
        "N": [N for _, N in points],
        "length_N": plan.length_sequences(c),
        "sample_length": c["scaling"]["sample_length"],
        "bootstrap": c["scaling"]["bootstrap"],
        "seed": c["seed"],
    }
    assert repr(settings.ScalingTable.from_config(c, "minilm").params()) == repr(old)
    e = settings.Eigen.from_config(c)
    assert (repr(e.variants), e.split_every, e.full_rank) == (
        repr(c["eigen"]["variants"]),
        c["eigen"]["split_every"],
        c["eigen"]["full_rank"],
    )
    assert settings.PerInput.from_config(c).params() == {"split": c["eigen"]["per_input_split"]}
    for cls, args in (
        (settings.Spectrum, ()),
        (settings.SubspaceOverlap, ("raw",)),
        (settings.ScalingTable, ("minilm",)),
        (settings.Eigen, ()),
        (settings.Overlap, ()),
        (settings.Scaling, ()),
    ):
        s = cls.from_config(c, *args)
        assert cls.from_params(s.params()) == s


def _config_imports(path) -> set[str]:
    """The eigenattn.config modules that a module imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eigenattn.config"):
            if node.module == "eigenattn.config":
                out |= {a.name for a in node.names}
            else:
                out.add(node.module.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Import):
            out |= {a.name.rsplit(".", 1)[-1] for a in node.names if a.name.startswith("eigenattn.config.")}
    return out


def test_config_modules_import_one_another_without_a_cycle():
    modules = {p.stem: p for p in (SRC / "config").glob("*.py") if p.stem != "__init__"}
    graph = {m: _config_imports(p) & set(modules) for m, p in modules.items()}
    order, done = [], set()

    def visit(m, trail):
        assert m not in trail, f"import cycle: {' -> '.join([*trail, m])}"
        if m not in done:
            for n in sorted(graph[m]):
                visit(n, [*trail, m])
            done.add(m)
            order.append(m)

    for m in sorted(graph):
        visit(m, [])
    assert order.index("sections") < order.index("plan") < order.index("settings") < order.index("validation")
