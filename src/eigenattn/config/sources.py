"""The local folders of ``source: path`` models: checked when the Snakefile is parsed, so that a
folder that is missing is refused before any job runs, and listed as the inputs of the rule that
fetches the model, so that editing the model re-fetches it and re-runs what reads it.

The one module of the config layer that reads the file system, and only these folders.
"""

from __future__ import annotations

from pathlib import Path

from eigenattn.config import plan
from eigenattn.errors import ConfigError


def check_model_folders(config: dict) -> None:
    """Every fetched model with ``source: path`` names a folder that holds a model (config.json, or
    a .gguf file). Models defined under ``models:`` but not used are not checked."""
    for m in plan.fetched_models(config):
        spec = config["models"][m]
        if spec.get("source") != "path":
            continue
        key, folder = f"models.{m}.path", Path(spec["path"])
        # a relative path is read from the working directory (Snakemake's --directory)
        where = "" if folder.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        drop = f"drop '{m}' from run_models" if m in config["run_models"] else "use training.vocab: wordpiece"
        fix = f"point {key} at a Hugging Face-format model folder (config.json, weights, tokenizer), or {drop}"
        if not folder.exists():
            raise ConfigError(key, f"the folder '{folder}' does not exist{where}", fix)
        if not folder.is_dir():
            raise ConfigError(key, f"'{folder}' is a file, not a folder{where}", fix)
        if not (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):
            raise ConfigError(key, f"the folder '{folder}'{where} holds no config.json (nor a .gguf file)", fix)


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
