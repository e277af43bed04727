"""One source of truth: enums, defaults and output paths are defined once, each stage imports only
the shared packages and earlier stages, parsing the Snakefile touches no data, and the workflow works
as a module. Every check walks the subpackages (rglob), so a moved file cannot hide from one."""

import ast
import re
import subprocess
import sys
import textwrap

import yaml

from conftest import CONFIGS, REPO, SNAKEMAKE, snakemake_env
from eigenattn.config import schema
from eigenattn.reconstruction import estimators
from eigenattn.reconstruction import evaluate as reconstruct
from eigenattn.spectra import moments
from eigenattn.training import model as mlm_model

SRC = REPO / "src" / "eigenattn"
# The library's packages in pipeline order. Rank 0 is shared: any stage may import it, and it imports no
# stage. A stage may import shared packages and earlier stages, never a later one.
STAGES = {
    "errors": 0,
    "config": 0,
    "storage": 0,
    "corpus": 1,
    "capture": 2,
    "spectra": 3,
    "reconstruction": 4,
    "training": 5,
    "claims": 6,
    "figures": 7,
}


def test_library_enums_come_from_the_schema():
    assert moments.VIEWS == schema.enum("eigen.views") == ("all", "prefix")
    assert moments.VARIANTS == schema.enum("eigen.variants")
    assert estimators.ESTIMATORS == schema.enum("reconstruction.estimators")
    assert estimators.STRATEGIES == schema.enum("reconstruction.strategies")
    assert reconstruct.TRANSFERS == schema.enum("reconstruction.transfer")
    assert mlm_model.MODES == schema.enum("training.modes")
    assert mlm_model.VARIANTS == ("exact", "uniform", *schema.enum("training.variants"))


def _enum_groups():
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("enum"), list) and len(node["enum"]) > 1:
                yield node["enum"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    return [g for g in walk(schema.SCHEMA) if all(isinstance(x, str) for x in g)]


def test_no_enum_or_default_written_twice():
    """No source file spells out a whole enum of the schema, and no function signature carries a
    default for a science value (the schema holds them)."""
    files = [*SRC.rglob("*.py"), *(REPO / "workflow").rglob("*.smk"), *(REPO / "workflow" / "scripts").glob("*.py")]
    for group in _enum_groups():
        pattern = r"\s*,\s*".join(f"[\"']{re.escape(v)}[\"']" for v in group)
        for f in files:
            assert not re.search(pattern, f.read_text()), f"{f.name} spells out the enum {group}"
    science = {
        "ridge",
        "rank",
        "split_every",
        "compression",
        "codec",
        "batch_size",
        "dtype",
        "autocast",
        "seed",
        "variants",
        "eval_rows",
        "n_sequences",
    }
    for f in SRC.rglob("*.py"):
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, ast.FunctionDef):
                args = fn.args.args[len(fn.args.args) - len(fn.args.defaults) :] + [
                    a for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None
                ]
                bad = [a.arg for a in args if a.arg in science]
                assert not bad, f"{f.name}:{fn.name} has defaults for {bad}"


def test_each_output_path_is_written_once():
    rules = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    paths = re.findall(r"\"((?:results|resources|logs|benchmarks)/[^\"]+)\"", rules)
    dup = {p for p in paths if paths.count(p) > 1}
    assert not dup, dup


def _package(module: str) -> str:
    """The top-level package of an ``eigenattn`` module path (``eigenattn.spectra.rows`` -> ``spectra``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "eigenattn" else ""


def _eigenattn_imports(path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of an eigenattn module in ``path``, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]
            if target == "eigenattn":  # `from eigenattn import x`: x is a package or a root name
                names = [f"eigenattn.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("eigenattn")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("eigenattn")]
    return found


def import_violations(src) -> list[str]:
    """Every import in the library that goes against the stage order (see STAGES)."""
    bad = []
    for path in sorted(src.rglob("*.py")):
        module = ".".join(["eigenattn", *path.relative_to(src).with_suffix("").parts]).removesuffix(".__init__")
        mine = _package(module)
        if mine not in STAGES:
            if module != "eigenattn":
                bad.append(f"{path.relative_to(src)}: not in a known package; add it to STAGES in pipeline order")
            continue
        for line, target in _eigenattn_imports(path, module):
            theirs = _package(target)
            if theirs not in STAGES:  # the root package's own names (__version__, SCORE_DEFINITION)
                continue
            if STAGES[theirs] > STAGES[mine] or (STAGES[mine] == 0 and STAGES[theirs] > 0):
                bad.append(f"{path.relative_to(src)}:{line} ({mine}) imports {target} ({theirs}), a later stage")
    return bad


def test_stages_import_only_shared_packages_and_earlier_stages():
    assert import_violations(SRC) == []
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert packages | modules == set(STAGES), "every package is ranked in STAGES and every rank exists"


def test_the_import_rule_fails_on_a_planted_import(tmp_path):
    """The rule is not vacuous: a copy of the library with one backwards import fails it, naming it."""
    import shutil

    copy = tmp_path / "eigenattn"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert import_violations(copy) == []
    planted = copy / "capture" / "masks.py"
    planted.write_text(planted.read_text() + "\nfrom eigenattn.claims.verdicts import iqr  # planted\n")
    relative = copy / "config" / "plan.py"
    relative.write_text(relative.read_text() + "\nfrom ..spectra import rows  # planted\n")
    bad = import_violations(copy)
    assert len(bad) == 2, bad
    assert "capture/masks.py" in bad[0] and "eigenattn.claims.verdicts (claims), a later stage" in bad[0]
    assert "config/plan.py" in bad[1] and "eigenattn.spectra (spectra), a later stage" in bad[1]


def _key_patterns() -> dict[str, re.Pattern]:
    """Every config key of the schema, dotted (``eigen.variants``, ``models.<name>.layers``), as a pattern
    that also finds it in the source of an f-string: ``<name>`` may be written ``{name}`` or a model's
    key, and the part up to it may be one formatted value (``{key}.sha256``). A last part with an
    underscore (``seq_len``, ``chunk_sequences``) is a key on its own too: no other word is spelt so."""
    out = {}
    for path, _ in schema._rows(schema.SCHEMA, ""):
        leaf = path.split(".")[-1]
        if "_" in leaf and leaf not in out:
            out[leaf] = re.compile(r"(?<![\w.{])" + re.escape(leaf) + r"(?![\w}])")
        if "." not in path and "_" not in path:  # seed, corpus, models: words a message uses plainly
            continue
        parts = [re.escape(p) for p in path.split(".")]
        if "<name>" in path:
            i = path.split(".").index("<name>")
            name = r"(?:<name>|\{[^}]*\}|[\w-]+)"
            head = r"(?:" + r"\.".join(parts[:i]) + r"\." + name + r"|\{[^}]*\})"
            pattern = r"\.".join([head, *parts[i + 1 :]])
        else:
            pattern = r"\.".join(parts)
        out[path] = re.compile(r"(?<![\w.])" + pattern + r"(?![\w])")
    return out


def error_shape_violations(files) -> list[str]:
    """A ValueError or RuntimeError whose message names a config key (raise ConfigError instead), and an
    InputError not given a path and a problem (InputError(path, problem, fix))."""
    keys = _key_patterns()
    bad = []
    for path in sorted(files):
        tree = ast.parse(path.read_text())
        for node in sorted((n for n in ast.walk(tree) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset)):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) in ("ValueError", "RuntimeError")
            ):
                text = " ".join(ast.unparse(a) for a in node.exc.args)
                named = [k for k, p in keys.items() if p.search(text)]
                if named:
                    bad.append(
                        f"{path.name}:{node.lineno}: {node.exc.func.id} names config key(s) {named}; "
                        "raise ConfigError(key, problem, fix)"
                    )
            called = getattr(node.func, "id", getattr(node.func, "attr", None)) if isinstance(node, ast.Call) else None
            if called == "InputError":
                given = len(node.args) + sum(k.arg in ("path", "problem") for k in node.keywords)
                if given < 2 or any(isinstance(a, ast.Starred) for a in node.args):
                    bad.append(f"{path.name}:{node.lineno}: InputError needs a path and a problem")
    return bad


def _error_files(src):
    return [*src.rglob("*.py"), *(REPO / "workflow" / "scripts").glob("*.py")]


def test_one_error_shape():
    """Errors a user fixes name what to change: a config value raises ConfigError with its key (never a
    ValueError that spells the key in its text), and every InputError names its input and the problem."""
    assert len(_key_patterns()) > 100
    assert error_shape_violations(_error_files(SRC)) == []


def test_the_error_shape_rule_fails_on_planted_errors(tmp_path):
    """The rule is not vacuous: a copy of the library with a ValueError that names a config key, one that
    names a model's key by a formatted value, and a message-only InputError fails it, naming each."""
    import shutil

    copy = tmp_path / "eigenattn"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert error_shape_violations(_error_files(copy)) == []
    planted = copy / "spectra" / "overlap.py"
    planted.write_text(
        planted.read_text()
        + textwrap.dedent("""
        def planted(k, d, name, key):
            if k > d:
                raise ValueError(f"overlap.k = {k} exceeds d = {d}")
            raise RuntimeError(f"layer out of range: fix models.{name}.layers or {key}.sha256")
            raise InputError(f"{d}: no path given apart")
        """)
    )
    bad = error_shape_violations(_error_files(copy))
    assert len(bad) == 3, bad
    assert "overlap.py" in bad[0] and "ValueError names config key(s) ['overlap.k']" in bad[0]
    assert "RuntimeError names config key(s) ['models.<name>.sha256', 'models.<name>.layers', " in bad[1]
    assert "'corpora.<name>.sha256'" in bad[1]
    assert "InputError needs a path and a problem" in bad[2]


def test_scripts_use_the_installed_package():
    scripts = "\n".join(p.read_text() for p in (REPO / "workflow" / "scripts").glob("*.py"))
    assert "sys.path" not in scripts  # the package is installed


AUDIT = textwrap.dedent("""
    import os, sys
    opened, sockets = [], []
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))
        elif event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"):
            sockets.append((event, str(args[1:2])))
    sys.addaudithook(hook)
    from snakemake.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
    print("OPENED", repr(opened))
    print("SOCKETS", repr(sockets))
""")


def test_parsing_reads_no_data_and_opens_no_socket(tiny_run):
    """Listing the rules of a finished working directory parses the Snakefile: it may read the
    config and the schema, never a model, corpus or result, and never reach the network (no
    connection or name lookup; Snakemake's own imports bind a loopback probe, which is not ours)."""
    wd, _ = tiny_run
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            AUDIT,
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(wd),
            "--configfile",
            *CONFIGS,
            "--list-rules",
        ],
        cwd=wd,
        capture_output=True,
        text=True,
    )
    assert "extract_scores" in proc.stdout, proc.stderr[-3000:]
    opened = eval(proc.stdout.split("OPENED ", 1)[1].splitlines()[0])
    sockets = eval(proc.stdout.split("SOCKETS ", 1)[1].splitlines()[0])
    data = [
        p
        for p in opened
        if p.startswith((str(wd / "resources"), str(wd / "results"))) or p.startswith(str((wd / "resources").resolve()))
    ]
    assert not data, data
    assert not sockets, sockets


def test_usable_as_a_snakemake_module(tmp_path):
    cfg = {**yaml.safe_load((REPO / "config.yaml").read_text())}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        f'module eigenattn:\n    snakefile: "{REPO / "Snakefile"}"\n    config: config\n'
        "use rule * from eigenattn as eigenattn_*\n"
    )
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "eigenattn_all"], cwd=tmp_path, capture_output=True, text=True, env=snakemake_env()
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "eigenattn_extract_scores" in out and "eigenattn_notebook" in out


def test_config_reference_is_generated_from_the_schema():
    assert (REPO / "docs" / "config.md").read_text() == schema.reference(), (
        "docs/config.md is stale: run `python -m eigenattn.config.schema > docs/config.md`"
    )


def test_method_references_resolve():
    """Every 'docs/method.md §N' cited in the repository names a section that exists."""
    method = (REPO / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", method, re.M))
    cited = set()
    for p in [
        *REPO.glob("*.md"),
        *REPO.glob("docs/*.md"),
        *SRC.rglob("*.py"),
        *SRC.rglob("*.yaml"),
        *(REPO / "workflow").rglob("*.smk"),
        REPO / "config.yaml",
    ]:
        text = p.read_text()
        assert "METHOD.md" not in text, p
        cited |= set(re.findall(r"method\.md §(\d+)", text))
    assert cited and cited <= sections, cited - sections


def test_settings_not_config_dicts_reach_the_library_and_scripts():
    """Only the config layer reads the config dict: no workflow script reads ``snakemake.config`` (the
    rules pass typed settings' params and Runtime), and no library function outside
    ``eigenattn.config`` takes a config dict (a parameter named config, cfg or tcfg)."""
    scripts = sorted((REPO / "workflow" / "scripts").rglob("*.py"))
    assert scripts
    reading = [f.name for f in scripts if "snakemake.config" in f.read_text()]
    assert not reading, f"scripts reading snakemake.config: {reading}"
    bad = []
    for f in SRC.rglob("*.py"):
        if (SRC / "config") in f.parents:
            continue
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = fn.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
                bad += [
                    f"{f.relative_to(SRC)}:{getattr(fn, 'name', 'lambda')}({n})"
                    for n in names
                    if n in ("config", "cfg", "tcfg")
                ]
    assert not bad, f"library functions taking a config dict: {bad}"


# The one store writer and the one store opener (eigenattn.storage.store).
WRITER, OPENER = ("storage/store.py", "new_store"), ("storage/store.py", "open_store")
ZARR_CREATORS = {"create_group", "group", "open", "create", "create_array", "open_array", "array", "open_consolidated"}


def _is_complete(node) -> bool:
    return isinstance(node, ast.Constant) and node.value == "complete"


def store_violations(src) -> list[str]:
    """Every place in the library, outside the one writer and the one opener, that creates or opens a
    Zarr store by hand, writes the ``complete`` marker, or reads it."""
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()

        def visit(node, func):
            where = (rel, func)
            found = []  # (what, allowed places)
            if isinstance(node, ast.Call):
                f = node.func
                name = (
                    f.attr
                    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "zarr"
                    else None
                )
                if name == "open_group":
                    mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
                    writes = not (isinstance(mode, ast.Constant) and mode.value == "r")
                    found.append(
                        (
                            "zarr.open_group(mode=w)" if writes else "zarr.open_group(mode=r)",
                            {WRITER} if writes else {OPENER},
                        )
                    )
                elif name in ZARR_CREATORS:
                    found.append((f"zarr.{name}(", {WRITER}))
                if isinstance(f, ast.Attribute) and f.attr == "get" and node.args and _is_complete(node.args[0]):
                    found.append(('.get("complete")', {OPENER}))
                if any(k.arg == "complete" for k in node.keywords):
                    found.append(("complete= keyword", {WRITER}))
            elif isinstance(node, ast.Dict) and any(_is_complete(k) for k in node.keys):
                found.append(('{"complete": ...}', {WRITER}))
            elif isinstance(node, ast.Subscript) and _is_complete(node.slice):
                writes = isinstance(node.ctx, (ast.Store, ast.Del))
                found.append(('["complete"] =' if writes else '["complete"]', {WRITER} if writes else {OPENER}))
            elif isinstance(node, ast.ImportFrom) and node.module == "zarr":
                names = {a.name for a in node.names} & (ZARR_CREATORS | {"open_group"})
                if names:
                    found.append((f"from zarr import {sorted(names)}", set()))
            bad.extend(f"{rel}:{node.lineno} ({func or 'module'}): {what}" for what, ok in found if where not in ok)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func = node.name if func is None else f"{func}.{node.name}"
            for child in ast.iter_child_nodes(node):
                visit(child, func)

        visit(ast.parse(path.read_text()), None)
    return bad


def test_one_store_writer_and_one_store_opener(tmp_path):
    """Only eigenattn.storage.store.new_store creates a store and writes its ``complete`` marker,
    and only open_store opens one and reads the marker; a planted second writer or check fails."""
    import shutil

    assert store_violations(SRC) == []
    source = (SRC / "storage" / "store.py").read_text()
    for what in [
        'zarr.open_group(zarr.storage.LocalStore(tmp), mode="w"',
        '"complete": True',
        'zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")',
        'a.get("complete")',
    ]:
        assert what in source, f"the writer/opener no longer contains {what}: update this test"
    copy = tmp_path / "eigenattn"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert store_violations(copy) == []
    planted = {
        "spectra/overlap.py": [
            'def w(p):\n    return zarr.open_group(p, mode="w")',
            "def c(p):\n    return zarr.create_group(p)",
            'def m(g):\n    g.attrs.update({"model": "m", "complete": True})',
            'def k(g):\n    g.attrs["complete"] = True',
            'def r(g):\n    return g.attrs.get("complete")',
            'def s(g):\n    return g.attrs["complete"]',
            'def o(p):\n    return zarr.open_group(p, mode="r")',
        ],
        "storage/store.py": ['def another_writer(p):\n    return zarr.open_group(p, mode="a")'],
    }
    for rel, snippets in planted.items():
        f = copy / rel
        f.write_text(f.read_text() + "\n\n" + "\n\n\n".join(snippets) + "  # planted\n")
    bad = store_violations(copy)
    assert len(bad) == 8, bad
    for needle in [
        "overlap.py:",
        "(w): zarr.open_group(mode=w)",
        "(c): zarr.create_group(",
        '(m): {"complete": ...}',
        '(k): ["complete"] =',
        '(r): .get("complete")',
        '(s): ["complete"]',
        "(o): zarr.open_group(mode=r)",
        "store.py:",
        "(another_writer): zarr.open_group(mode=w)",
    ]:
        assert any(needle in b for b in bad), (needle, bad)
