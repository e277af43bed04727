"""One source of truth: enums, defaults and output paths are defined once, the config layer alone
speaks of config keys, parsing the Snakefile touches no data, and the workflow works as a module."""

import ast
import re
import subprocess
import sys
import textwrap

import yaml

from conftest import CONFIGS, REPO, SNAKEMAKE
from eigenattn import estimators, mlm_model, moments, reconstruct, schema

SRC = REPO / "src" / "eigenattn"
CONFIG_LAYER = {"config.py", "plan.py", "errors.py"}


def test_library_enums_come_from_the_schema():
    assert moments.VIEWS == schema.enum("eigen.views") == ("all", "prefix")
    assert moments.VARIANTS == schema.enum("eigen.variants")
    assert estimators.ESTIMATORS == schema.enum("reconstruction.estimators")
    assert estimators.STRATEGIES == schema.enum("reconstruction.strategies")
    assert reconstruct.TRANSFERS == schema.enum("reconstruction.transfer")
    assert mlm_model.MODES == schema.enum("training.modes")
    assert mlm_model.VARIANTS == ("exact", *schema.enum("training.variants"))


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
    files = [*SRC.glob("*.py"), *(REPO / "workflow").rglob("*.smk"), *(REPO / "workflow" / "scripts").glob("*.py")]
    for group in _enum_groups():
        pattern = r"\s*,\s*".join(f"[\"']{re.escape(v)}[\"']" for v in group)
        for f in files:
            assert not re.search(pattern, f.read_text()), f"{f.name} spells out the enum {group}"
    science = {"ridge", "rank", "split_every", "compression", "codec", "batch_size", "dtype", "autocast", "seed",
               "variants", "eval_rows", "n_sequences"}
    for f in SRC.glob("*.py"):
        for fn in ast.walk(ast.parse(f.read_text())):
            if isinstance(fn, ast.FunctionDef):
                args = fn.args.args[len(fn.args.args) - len(fn.args.defaults):] + \
                    [a for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None]
                bad = [a.arg for a in args if a.arg in science]
                assert not bad, f"{f.name}:{fn.name} has defaults for {bad}"


def test_each_output_path_is_written_once():
    rules = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    paths = re.findall(r"\"((?:results|resources|logs|benchmarks)/[^\"]+)\"", rules)
    dup = {p for p in paths if paths.count(p) > 1}
    assert not dup, dup


def test_modules_are_small_and_only_the_config_layer_names_keys():
    for f in SRC.glob("*.py"):
        text = f.read_text()
        assert len(text.splitlines()) <= 300, f"{f.name}: {len(text.splitlines())} lines"
        if f.name not in CONFIG_LAYER:
            assert "ConfigError" not in text, f"{f.name} imports ConfigError"
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
    proc = subprocess.run([sys.executable, "-c", AUDIT, "-s", str(REPO / "Snakefile"), "-d", str(wd),
                           "--configfile", *CONFIGS, "--list-rules"], cwd=wd, capture_output=True, text=True)
    assert "extract_scores" in proc.stdout, proc.stderr[-3000:]
    opened = eval(proc.stdout.split("OPENED ", 1)[1].splitlines()[0])
    sockets = eval(proc.stdout.split("SOCKETS ", 1)[1].splitlines()[0])
    data = [p for p in opened if p.startswith((str(wd / "resources"), str(wd / "results")))
            or p.startswith(str((wd / "resources").resolve()))]
    assert not data, data
    assert not sockets, sockets


def test_usable_as_a_snakemake_module(tmp_path):
    cfg = {**yaml.safe_load((REPO / "config.yaml").read_text())}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\n'
        f'module eigenattn:\n    snakefile: "{REPO / "Snakefile"}"\n    config: config\n'
        "use rule * from eigenattn as eigenattn_*\n")
    proc = subprocess.run([*SNAKEMAKE, "-n", "eigenattn_all"], cwd=tmp_path, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "eigenattn_extract_scores" in out and "eigenattn_notebook" in out


def test_config_reference_is_generated_from_the_schema():
    assert (REPO / "docs" / "config.md").read_text() == schema.reference(), \
        "docs/config.md is stale: run `python -m eigenattn.schema > docs/config.md`"


def test_method_references_resolve():
    """Every 'docs/method.md §N' cited in the repository names a section that exists."""
    method = (REPO / "docs" / "method.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", method, re.M))
    cited = set()
    for p in [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *SRC.glob("*.py"), *SRC.glob("*.yaml"),
              *(REPO / "workflow").rglob("*.smk"), REPO / "config.yaml"]:
        text = p.read_text()
        assert "METHOD.md" not in text, p
        cited |= set(re.findall(r"method\.md §(\d+)", text))
    assert cited and cited <= sections, cited - sections
