"""The config schema, shipped with the package: the one place that defines every config key, its
allowed values and its default. Library modules take their enums from here."""

from __future__ import annotations

from importlib import resources

import yaml

SCHEMA_FILE = resources.files("eigenattn.config") / "config.schema.yaml"
# libyaml's loader where PyYAML has it: the same safe load, 0.03 s instead of 0.25 s, paid on every
# parse of the Snakefile (each job parses it again)
SCHEMA: dict = yaml.load(SCHEMA_FILE.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def node(path: str) -> dict:
    """The schema node of a dotted config key (following $refs, and `items` of arrays)."""
    n = SCHEMA
    for part in path.split("."):
        while "$ref" in n:
            n = SCHEMA["$defs"][n["$ref"].split("/")[-1]]
        n = n["properties"][part]
    while "$ref" in n:
        n = SCHEMA["$defs"][n["$ref"].split("/")[-1]]
    return n


def enum(path: str) -> tuple:
    """The allowed values of a key (of its items, for a list)."""
    n = node(path)
    n = n.get("items", n)
    if "enum" in n:
        return tuple(n["enum"])
    return tuple(v for alt in n.get("oneOf", []) for v in alt.get("items", alt).get("enum", ()))


def _rows(n: dict, prefix: str):
    while "$ref" in n:
        n = SCHEMA["$defs"][n["$ref"].split("/")[-1]]
    for key, sub in n.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        while "$ref" in sub:
            sub = {**SCHEMA["$defs"][sub["$ref"].split("/")[-1]], **{k: v for k, v in sub.items() if k != "$ref"}}
        if "properties" in sub:
            yield path, sub
            yield from _rows(sub, path)
        elif isinstance(sub.get("additionalProperties"), dict):  # models.<name>, corpora.<name>
            yield path, sub
            yield from _rows(sub["additionalProperties"], f"{path}.<name>")
        else:
            yield path, sub


def reference() -> str:
    """docs/config.md: every config key with its type, default and description, from the schema."""

    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/eigenattn/config/config.schema.yaml` by",
        "`python -m eigenattn.config.schema > docs/config.md`; a test keeps the two in step. `config.yaml`",
        "holds science parameters only; threads, memory and GPUs belong in `profiles/` and the rules'",
        "`resources:`.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for path, n in _rows(SCHEMA, ""):
        kind = n.get("type") or (
            "one of " + ", ".join(map(str, n["enum"]))
            if "enum" in n
            else " or ".join(str(a.get("const", a.get("type"))) for a in n.get("oneOf", []))
        )
        if "enum" in n.get("items", {}):
            kind = "list of " + ", ".join(n["items"]["enum"])
        elif n.get("type") == "array":
            kind = f"list of {n.get('items', {}).get('type', 'values')}"
        if isinstance(kind, list):
            kind = " or ".join(map(str, kind))
        default = f"`{n['default']}`" if "default" in n else ""
        lines.append(f"| `{path}` | {cell(kind)} | {cell(default)} | {cell(n.get('description', ''))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
