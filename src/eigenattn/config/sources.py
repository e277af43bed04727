"""The local sources of a config: the folders of ``source: path`` models and the files of a
``source: files`` corpus. Checked when the Snakefile is parsed, so that a source that is missing is
refused before any job runs; a model folder's files are also the inputs of the rule that fetches
the model, so that editing the model re-fetches it and re-runs what reads it.

The one module of the config layer that reads the file system, and only these user-given paths
(a model folder's config.json, for its layer count and positions; nothing under resources/).
"""

from __future__ import annotations

import json
from pathlib import Path

from eigenattn.config import plan
from eigenattn.config.validation import check_layer_range
from eigenattn.errors import ConfigError

# config.json keys of the layer count and the position limit, across architectures
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def check(config: dict) -> None:
    """Every local source of the run: model folders (:func:`check_model_folders`) and corpus files
    (:func:`check_corpus_files`)."""
    check_model_folders(config)
    check_corpus_files(config)


def _where(p: Path) -> str:
    # a relative path is read from the working directory (Snakemake's --directory)
    return "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"


def check_corpus_files(config: dict) -> None:
    """The corpus of the run, when ``source: files``: every path it lists is a file that exists
    (corpora defined but not used are not checked)."""
    name = config["corpus"]
    spec = config["corpora"][name]
    if spec.get("source") != "files":
        return
    missing = [(i, p) for i, p in enumerate(spec["paths"]) if not Path(p).is_file()]
    if not missing:
        return
    i, first = missing[0]
    key = f"corpora.{name}.paths[{i}]" if len(missing) == 1 else f"corpora.{name}.paths"
    shown = ", ".join(f"'{p}'" for _, p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    problem = "no such file" if len(missing) == 1 else f"{len(missing)} of its {len(spec['paths'])} files do not exist"
    raise ConfigError(
        key,
        f"{problem}: {shown}{_where(Path(first))}",
        "list existing .txt, .jsonl or .parquet files (one document per .txt file), with absolute paths or "
        "paths relative to the working directory",
    )


def _model_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _first(d: dict, keys) -> int | None:
    for k in keys:
        for where in (d, d.get("text_config") or {}):
            if isinstance(where.get(k), int):
                return where[k]
    return None


def check_model_folders(config: dict) -> None:
    """Every fetched model with ``source: path`` names a folder that holds a model (config.json, or
    a .gguf file). Models defined under ``models:`` but not used are not checked."""
    for m in plan.fetched_models(config):
        spec = config["models"][m]
        if spec.get("source") != "path":
            continue
        key, folder = f"models.{m}.path", Path(spec["path"])
        where = _where(folder)
        drop = f"drop '{m}' from run_models" if m in config["run_models"] else "use training.vocab: wordpiece"
        fix = f"point {key} at a Hugging Face-format model folder (config.json, weights, tokenizer), or {drop}"
        if not folder.exists():
            raise ConfigError(key, f"the folder '{folder}' does not exist{where}", fix)
        if not folder.is_dir():
            raise ConfigError(key, f"'{folder}' is a file, not a folder{where}", fix)
        if not (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):
            raise ConfigError(key, f"the folder '{folder}'{where} holds no config.json (nor a .gguf file)", fix)
        _check_against_config_json(config, m, folder)


def _check_against_config_json(config: dict, m: str, folder: Path) -> None:
    """What the config asks of a local model that its config.json rules out: layer indices beyond
    its layers, and (where ``max_positions`` is not set) a seq_len beyond its positions."""
    spec, cfg = config["models"][m], _model_config(folder)
    n_layers = _first(cfg, LAYER_KEYS)
    layers = spec.get("layers", "all")
    if n_layers and isinstance(layers, list):
        check_layer_range(m, layers, n_layers, f"num_hidden_layers in {folder / 'config.json'}")
    positions = _first(cfg, POSITION_KEYS)
    n = config["sampling"]["seq_len"]
    if m in config["run_models"] and not spec.get("max_positions") and positions and n > positions:
        raise ConfigError(
            "sampling.seq_len",
            f"{n} exceeds the {positions} positions of model '{m}' (max_position_embeddings in "
            f"{folder / 'config.json'})",
            f"use seq_len <= {positions}, or drop '{m}' from run_models",
        )


def model_files(spec: dict) -> list[str]:
    """The files of a ``source: path`` model's folder, hidden ones (a .git or .cache folder) left
    out; none for a model from any other source."""
    if spec.get("source") != "path":
        return []
    folder = Path(spec["path"])
    return sorted(
        str(p)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
