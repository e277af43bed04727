"""The config layer: the only module that speaks of config keys.

- :func:`coerce_overrides` types the nested values of ``--config``, which Snakemake passes as
  strings, by the schema before it checks them.
- :func:`explain` turns a schema violation (from ``snakemake.utils.validate``, which also fills
  in the defaults) into a :class:`ConfigError` that names the key and the fix.
- :func:`adapt` fits the grids left at their schema defaults to the run (the values beyond what
  ``sampling.seq_len`` allows are dropped, the budgets below the cheapest plan too) and returns a
  line for each: defaults adapt, explicit asks are checked.
- :func:`check` runs the cross-key checks a schema cannot express: among them the grids the user
  wrote against the length (every conflict in one :class:`~eigenattn.errors.ConfigErrors`), plan
  budgets against the cheapest plan, layer lists, and an explicit ``extraction.layer_groups``. It is
  a pure function of the config dict: it reads no file and opens no socket, so it runs when the
  Snakefile is parsed. Every message writes keys one way: ``plans.budgets[0]``, ``models.bb.revision``.
- Checks that need data run in the rule that has the data, and still name the key:
  :func:`check_corpus_capacity` (sampling), :func:`check_model_facts` and
  :func:`check_store_room` (extraction, after the equivalence probe) and
  :meth:`~eigenattn.config.settings.Runtime.torch_device` (any rule that picks a device).
- The score stores against the free disk, before any job runs: :mod:`eigenattn.config.disk`.
"""

from __future__ import annotations

import jsonschema
import yaml

from eigenattn.config import disk, plan
from eigenattn.config.schema import SCHEMA, SCHEMA_FILE, node
from eigenattn.config.sections import Eigen, Overlap, Scaling
from eigenattn.config.settings import ModelFacts
from eigenattn.config.views import View
from eigenattn.errors import ConfigError, raise_all
from eigenattn.storage import sizes


def _key(path) -> str:
    """A config key as every message writes it: dots between names, brackets around list indices
    (``plans.budgets[0]``, ``run_models[1]``)."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _schema_at(path) -> dict:
    """The schema node at a config path (names of mappings like ``models.<name>`` and list indices
    followed through ``additionalProperties`` and ``items``); {} where the path leaves the schema."""
    n = SCHEMA
    for p in path:
        n = _resolve(n)
        if isinstance(p, int):
            n = n.get("items", {})
        elif p in n.get("properties", {}):
            n = n["properties"][p]
        elif isinstance(n.get("additionalProperties"), dict):
            n = n["additionalProperties"]
        else:
            return {}
    return {**_resolve(n), **{k: v for k, v in n.items() if k != "$ref"}}  # a $ref's own description kept


def _description(path) -> str | None:
    try:
        return node(".".join(str(p) for p in path if not isinstance(p, int))).get("description")
    except KeyError:
        return None


FIXES = {
    "minimum": "use a value of at least {v}",
    "exclusiveMinimum": "use a value above {v}",
    "maximum": "use a value of at most {v}",
    "exclusiveMaximum": "use a value below {v}",
    "minItems": "list at least {v} value(s)",
    "maxItems": "list at most {v} value(s)",
    "uniqueItems": "list each value once",
    "minProperties": "give at least {v} entr(y/ies)",
    "pattern": "write it to match the pattern {v}",  # unless PATTERNS says it in words
    "const": "write {v}",
}


# Patterns of the schema, in words: what a user may write.
PATTERNS = {
    "^(auto|cpu|cuda(:[0-9]+)?)$": "use auto (CUDA when it is present, else the CPU), cpu, cuda, or cuda:N for the "
    "GPU numbered N (cuda:0, cuda:1, ...)",
    "^[0-9a-fA-F]{64}$": "write the file's sha256: 64 hexadecimal digits, as `sha256sum FILE` prints them",
    "^[A-Za-z0-9_.\\-]+==[A-Za-z0-9_.+\\-]+$": "write the package pinned to one version: name==version "
    "(e.g. gensim==4.4.0)",
}

# Fixes of one key's bound that need more words than the bound.
KEY_FIXES = {
    ("sampling.seq_len", "maximum"): "use a length of at most 1,048,576 (2^20, beyond the positions of any model: "
    "one head's scores of one sequence would take 4 TB); a model's own limit is checked when you set "
    "models.<name>.max_positions",
}

# What to write for a required key of a model (models.<name>) that is missing, where its description
# alone would not say why.
REQUIRED = {
    "revision": "add {key}.revision: the commit sha (or tag) of {where} to download. It pins the weights, so that "
    "a re-run, or another machine, gets the same model and the same results (reproducibility); e.g. "
    "`revision: 7ae557604adf67be50417f59c2c2f167def9a775` (the sha on the repository's 'Files and versions' "
    "page), or `revision: main` to follow the branch, which is not reproducible",
    "causal": "add {key}.causal: true for a decoder (causal LM), false for an encoder",
    "sha256": "add {key}.sha256: the sha256 of every extracted file, keyed by its path inside `member` "
    "(`sha256sum FILE` prints it)",
}


# Keys an earlier version had, with what replaced them.
MOVED = {
    "training.exact_seeds": (
        "was merged into training.seeds: exact, the uniform floor and every variant now share one list of "
        "seeds (a paired design, docs/method.md §8)",
        "delete exact_seeds and list its seeds under training.seeds (at least two; the default is [0, 1, 2, 3])",
    ),
}


def explain(error: jsonschema.ValidationError) -> ConfigError:
    """A ConfigError for a schema violation: the dotted key, what is wrong, and what to write."""
    key = _key(error.absolute_path)
    desc = _description(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = f"{key}.{extra[0]}" if error.absolute_path else extra[0]
        if where in MOVED:
            return ConfigError(where, *MOVED[where])
        return ConfigError(
            where,
            f"unknown key '{where}' (misspelt?)",
            f"use one of the keys allowed here: {', '.join(allowed)}" if allowed else None,
        )
    if error.validator == "propertyNames" or "propertyNames" in list(error.absolute_schema_path):
        return ConfigError(
            key,
            f"the name {error.instance!r} is not allowed ({error.message})",
            "use a name of letters, digits, '_' and '-' that starts with a letter or digit (it "
            "becomes a folder name and a wildcard value)",
        )
    if error.validator == "enum":
        return ConfigError(key, error.message, f"use one of: {', '.join(map(str, error.validator_value))}")
    if error.validator == "required":
        return _missing(error, key)
    if error.validator == "type":
        kinds = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return ConfigError(
            key, error.message, f"write a value of type {' or '.join(kinds)}" + (f": {desc}" if desc else "")
        )
    if (key, error.validator) in KEY_FIXES:
        return ConfigError(key, error.message, KEY_FIXES[key, error.validator])
    if error.validator == "pattern" and error.validator_value in PATTERNS:
        return ConfigError(key, f"{error.instance!r} is not allowed", PATTERNS[error.validator_value])
    if error.validator in FIXES:
        return ConfigError(key, error.message, FIXES[error.validator].format(v=error.validator_value))
    if error.validator in ("oneOf", "anyOf"):
        return ConfigError(key, _no_alternative(error), f"write {_allowed(error.validator_value)}")
    return ConfigError(key, error.message, f"write a value that fits: {desc}" if desc else "see docs/config.md")


def _missing(error: jsonschema.ValidationError, key: str) -> ConfigError:
    """A required key that is missing: named in full (``models.bb.revision``), with what to write."""
    instance = error.instance if isinstance(error.instance, dict) else {}
    missing = [k for k in error.validator_value if k not in instance]
    if not missing:
        return ConfigError(key, error.message, "add the missing key")
    name = missing[0]
    full = f"{key}.{name}" if error.absolute_path else name
    problem = f"the key '{name}' is missing" + (f" (source: {instance['source']})" if "source" in instance else "")
    if name in REQUIRED and list(error.absolute_path)[:1] == ["models"]:
        where = f"the repository {instance['repo_id']}" if "repo_id" in instance else "the repository"
        return ConfigError(full, problem, REQUIRED[name].format(key=key, where=where))
    desc = _schema_at([*error.absolute_path, name]).get("description")
    return ConfigError(full, problem, f"add {full}" + (f": {desc}" if desc else ""))


def _literal(v) -> str:
    """A value as it is written in the config file."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _kind(t: str, n: dict) -> str:
    kind = {"integer": "an integer", "number": "a number", "array": "a list", "object": "a mapping"}.get(t, f"a {t}")
    if "minimum" in n:
        kind += f" of at least {n['minimum']}"
    return _literal(None) if t == "null" else kind


def _one_allowed(n: dict) -> str:
    """What one alternative of a oneOf/anyOf takes, as a user would write it."""
    n = _resolve(n)
    if "const" in n:
        return _literal(n["const"])
    if "enum" in n:
        return "one of " + ", ".join(map(_literal, n["enum"]))
    if n.get("type") == "array":
        items = _resolve(n.get("items", {}))
        if "enum" in items:
            return "a list of: " + ", ".join(map(_literal, items["enum"]))
        noun = {"array": "list", "object": "mapping"}.get(items.get("type"), items.get("type"))
        return f"a list of {noun}s" if isinstance(noun, str) else "a list"
    t = n.get("type", "value")
    return " or ".join(_kind(x, n) for x in t) if isinstance(t, list) else _kind(t, n)


def _allowed(alternatives: list) -> str:
    """Every alternative of a oneOf/anyOf: 'auto, or a list of: all, prefix'."""
    shown = [_one_allowed(a) for a in alternatives]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + ", or " + shown[-1]


def _no_alternative(error: jsonschema.ValidationError) -> str:
    """The value that fits no alternative, and why it fails the alternative of its kind: the error
    inside the value (a list item not in the enum) or of its own range (a number below the
    minimum), not that it is not the const or the type of the other alternatives."""
    inside = [e for e in error.context if e.relative_path or e.validator not in ("type", "const", "enum")]
    problem = f"{error.instance!r} is not allowed"
    if inside:
        problem += ": " + max(inside, key=lambda e: len(e.relative_path)).message
    return problem


def validation_error(exc: BaseException) -> jsonschema.ValidationError | None:
    """The schema violation inside what ``snakemake.utils.validate`` raised, if any."""
    seen = exc
    while seen is not None:  # snakemake raises its WorkflowError while handling the ValidationError
        if isinstance(seen, jsonschema.ValidationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# ------------------------------------------------------------------ values from the command line


def _resolve(n: dict) -> dict:
    while "$ref" in n:
        n = SCHEMA["$defs"][n["$ref"].split("/")[-1]]
    return n


def _alternatives(n: dict) -> list[dict]:
    return [_resolve(a) for a in n.get("oneOf", []) + n.get("anyOf", [])]


def _takes_string(n: dict, value: str) -> bool:
    """Whether the schema node allows this string as it is (a string type, or an enum or const
    that lists it); a node that says nothing takes it."""
    n = _resolve(n)
    if "type" in n:
        return "string" in (n["type"] if isinstance(n["type"], list) else [n["type"]])
    if "const" in n:
        return n["const"] == value
    if "enum" in n:
        return value in n["enum"]
    alternatives = _alternatives(n)
    return not alternatives or any(_takes_string(a, value) for a in alternatives)


def _typed(value, n: dict | None):
    """``value`` with each string that the schema node does not take read as YAML."""
    if n is None:
        return value
    n = _resolve(n)
    if isinstance(value, str):
        if _takes_string(n, value):
            return value
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return value if isinstance(parsed, str) else parsed
    if isinstance(value, list):
        items = next((a["items"] for a in [n, *_alternatives(n)] if "items" in a), None)
        return [_typed(v, items) for v in value]
    if isinstance(value, dict):
        return {k: _typed(v, _child(n, k)) for k, v in value.items()}
    return value


def _child(n: dict, key: str) -> dict | None:
    n = _resolve(n)
    if key in n.get("properties", {}):
        return n["properties"][key]
    extra = n.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def coerce_overrides(config: dict, overrides) -> dict:
    """Type the values given with ``--config``, in ``config`` (which holds them already).

    Snakemake reads a nested ``--config`` value (``sampling={seq_len: 64}``) with YAML's base loader,
    which keeps every scalar a string. Each such string that its schema node does not take is read
    as YAML (64, 0.25, null, false), so the schema checks the value the user wrote; a string the
    schema takes (a path, a name, ``auto``) is kept, and a value of the wrong type is still refused.
    ``overrides``: the ``--config`` values (``workflow.config_settings.config``)."""

    def walk(target: dict, given, n: dict | None) -> None:
        for key, value in given.items():
            sub = _child(n, key) if n is not None else None
            if key not in target or sub is None:
                continue  # an unknown key: the schema names it
            if isinstance(value, dict) and isinstance(target[key], dict):
                walk(target[key], value, sub)
            else:
                target[key] = _typed(target[key], sub)

    walk(config, overrides or {}, SCHEMA)
    return config


def validate(config: dict) -> dict:
    """Validate and fill defaults outside a workflow (tests, notebooks), as the Snakefile does."""
    from snakemake.utils import validate as snakemake_validate  # snakemake is only needed here

    try:
        snakemake_validate(config, str(SCHEMA_FILE))
    except Exception as e:  # noqa: BLE001 - WorkflowError wraps the ValidationError
        err = validation_error(e)
        if err is None:
            raise
        raise explain(err) from None
    return config


# ----------------------------------------------------------------------------------- at parse time


def check(config: dict) -> None:
    """Cross-key checks; a function of the config dict alone."""
    models, corpora = config["models"], config["corpora"]
    for i, m in enumerate(config["run_models"]):
        if m not in models:
            raise ConfigError(
                f"run_models[{i}]",
                f"unknown model '{m}'",
                f"define it under `models:` or use one of: {', '.join(sorted(models))}",
            )
    if config["corpus"] not in corpora:
        raise ConfigError(
            "corpus",
            f"unknown corpus '{config['corpus']}'",
            f"define it under `corpora:` or use one of: {', '.join(sorted(corpora))}",
        )
    trained = config["training"]["analysis_model"]
    if trained in models:
        raise ConfigError(
            "training.analysis_model",
            f"'{trained}' is already a model under `models:`",
            "choose another key for the trained model",
        )
    n = config["sampling"]["seq_len"]
    for m in plan.fetched_models(config):
        _check_layers(config, m)
    for m in config["run_models"]:
        if models[m].get("causal") is None:
            raise ConfigError(
                f"models.{m}.causal",
                "is not set; the views of a model are planned before it is fetched",
                "set causal: true for a decoder (causal LM), false for an encoder "
                "(extraction checks it against the model's masks)",
            )
        pos = models[m].get("max_positions")
        if pos and n > pos:
            raise ConfigError(
                "sampling.seq_len",
                f"{n} exceeds the {pos} positions of model '{m}'",
                f"use seq_len <= {pos}, or drop '{m}' from run_models",
            )
        plan.model_views(config, m)  # raises for an undefined view
    _check_extraction(config)
    _check_views(config)
    raise_all(
        length_conflicts(config),
        f"sampling.seq_len = {n} is too short for these keys (the defaults you did not change adapt to it; "
        "these were written, so they are checked)",
    )
    _check_overlap(config)
    _check_reconstruction(config)
    _check_training(config)
    _check_scaling(config)
    _check_plans(config)
    _check_layer_groups(config)


# ------------------------------------------------------------ grids bounded by the sequence length


def _grids(config: dict) -> list[tuple[str, str, list, int, str]]:
    """Every list whose values must fit the sequence length: (key, symbol, values, bound, what the
    bound is). The bounds of the eigen and reconstruction grids are over every view that runs, so
    following them cannot fail again for another model or view."""
    n = config["sampling"]["seq_len"]
    d, m, v = _smallest_view(config, lambda m: plan.model_views(config, m))
    view = f"the d = {d} keys of view '{v}' (seq_len {n}) for model '{m}', the smallest of the views that run"
    dp, mp, vp = _smallest_view(config, lambda m: [plan.plugin_view(config, m)])
    plug = f"the d = {dp} keys of view '{vp}' (seq_len {n}) for model '{mp}', the smallest plug-in view"
    out = [
        ("overlap.k", "k", list(Overlap.from_config(config).k), d, view),
        ("eigen.report_k", "k", list(Eigen.from_config(config).report_k), d, view),
        ("reconstruction.subset_sizes", "s", list(config["reconstruction"]["subset_sizes"]), d, view),
        ("plugin.subset_sizes", "s", list(config["plugin"]["subset_sizes"]), dp, plug),
    ]
    t, tokens = config["training"], f"the {n} tokens of a sequence (sampling.seq_len)"
    if isinstance(t["subset_sizes"], dict):
        out += [
            (f"training.subset_sizes.{mode}", "s", plan.training_sizes(config, mode), n, tokens)
            for mode in t["modes"]
            if mode in t["subset_sizes"]
        ]
    elif t["modes"]:
        out.append(("training.subset_sizes", "s", list(t["subset_sizes"]), n, tokens))
    return out


def _default(key: str):
    """The schema's default of a key (``training.subset_sizes.<mode>``: that mode's entry)."""
    parts = key.split(".")
    if parts[0] == "training" and parts[1] == "subset_sizes" and len(parts) == 3:
        return node("training.subset_sizes")["default"].get(parts[2])
    return node(key).get("default")


def _set(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    target = config
    for p in parents:
        target = target[p]
    target[last] = value


def adapt(config: dict) -> list[str]:
    """Fit the defaults the user left alone to the run, in ``config``; return one line for each.

    A grid bounded by the sequence length (:func:`_grids`: overlap.k, eigen.report_k, the subset
    sizes of reconstruction, plugin and training) whose value is still the schema's default keeps
    only the values the length allows, so that shrinking ``sampling.seq_len`` needs no other edit.
    A grid the user wrote (a value other than the default) is kept as written and checked by
    :func:`check`, which reports every such conflict in one message. A default with no value left
    is kept too, and refused with a fix. The Snakefile calls this before :func:`check`; a config
    that the first checks refuse is left to them."""
    try:
        grids = _grids(config)
    except (ConfigError, KeyError, ValueError, TypeError):
        return []
    notes = []
    for key, _, values, bound, what in grids:
        kept = [x for x in values if x <= bound]
        if values != _default(key) or kept == values or not kept:
            continue
        _set(config, key, kept)
        dropped = [x for x in values if x > bound]
        notes.append(
            f"{key}: the default {values} -> {kept} ({dropped} exceed {what}; write {key} to choose other values)"
        )
    budgets = config["plans"]["budgets"]
    if budgets and budgets == _default("plans.budgets"):
        share, s, d, view, m = _cheapest(config)
        kept = [b for b in budgets if b >= share - 1e-12]
        if kept != budgets:
            config["plans"]["budgets"] = kept
            notes.append(
                f"plans.budgets: the default {budgets} -> {kept} (the cheapest plan of model '{m}' costs {share:.4g} "
                f"of exact attention: s = {s} of the d = {d} keys of view '{view}'"
                + ("; no plans are made" if not kept else "")
                + "; write plans.budgets to choose other values)"
            )
    if config["plans"].get("scope") == "whole":
        encoders = [m for m in config.get("run_models", []) if not config["models"].get(m, {}).get("causal", True)]
        if encoders:
            notes.append(
                f"plans.scope: whole runs every query of a causal head; {', '.join(encoders)} "
                "(an encoder) keeps view-scope plans"
            )
    return notes


def length_conflicts(config: dict) -> list[ConfigError]:
    """Every grid with values beyond its bound (see :func:`_grids`), one error per key, so that one
    message lists them all."""
    errors = []
    for key, sym, values, bound, what in _grids(config):
        bad = [x for x in values if x > bound]
        if not bad:
            continue
        kept = [x for x in values if x <= bound]
        default = values == _default(key)
        problem = f"{sym} = {bad} exceeds {what}" + (" (the default, and none of its values fits)" if default else "")
        noun = "k" if sym == "k" else "subset sizes"
        fix = f"use {noun} <= {bound}" + (f", e.g. {key}: {kept}" if kept else f", e.g. {key}: [{max(1, bound // 2)}]")
        errors.append(ConfigError(key, problem, fix))
    return errors


# ----------------------------------------------------------------------------- layers, plans, groups


def _check_layers(config: dict, m: str) -> None:
    """A model's layer list: each layer once, and within the model's layers where the config says
    how many it has (``models.<name>.n_layers``); a local model's config.json is read by
    :func:`eigenattn.config.sources.check_model_folders`, and extraction checks every model."""
    layers = config["models"][m].get("layers", "all")
    if not isinstance(layers, list):
        return
    dups = sorted({x for x in layers if layers.count(x) > 1})
    if dups:
        raise ConfigError(
            f"models.{m}.layers",
            f"lists layer(s) {dups} more than once (each would be captured and counted twice)",
            f"list each layer once: {sorted(set(layers))}",
        )
    n_layers = config["models"][m].get("n_layers")
    if n_layers:
        check_layer_range(m, layers, n_layers, f"models.{m}.n_layers")


def check_layer_range(model: str, layers: list, n_layers: int, source: str) -> None:
    """Layer indices within a model's ``n_layers`` (``source``: where that count comes from)."""
    bad = [x for x in layers if x >= n_layers]
    if bad:
        raise ConfigError(
            f"models.{model}.layers",
            f"layer(s) {bad} out of range for a model with {n_layers} layers ({source})",
            f"use 'all' or indices in 0..{n_layers - 1}",
        )


def cheapest_share(config: dict, model: str) -> tuple[float, int, int, str]:
    """(cost share, s, d, view) of the cheapest candidate of a model's plans: the smallest subset
    size s of ``reconstruction.subset_sizes`` that its plug-in view's d keys allow, at s / d of exact
    attention. In the one cost model (:mod:`eigenattn.reconstruction.cost`) every method computes at
    least s scores per query and reads at least s values, so no candidate costs less than s / d, and
    subset_only and sink_window cost exactly that."""
    view, n = plan.plugin_view(config, model), config["sampling"]["seq_len"]
    d = plan.view_dim(view, n)
    s = min((x for x in config["reconstruction"]["subset_sizes"] if x <= d), default=d)
    return s / d, s, d, view


def _cheapest(config: dict) -> tuple[float, int, int, str, str]:
    """(cost share, s, d, view, model) of the run model whose cheapest plan costs the most."""
    return max((*cheapest_share(config, m), m) for m in config["run_models"])


def _check_plans(config: dict) -> None:
    """Each budget of ``plans.budgets`` at least the cheapest plan's cost share (every head on its
    cheapest candidate) for every run model: a lower budget has no plan."""
    budgets = [float(b) for b in config["plans"]["budgets"]]
    if not budgets:
        return
    share, s, d, view, m = _cheapest(config)
    bad = [i for i, b in enumerate(budgets) if b < share - 1e-12]
    if not bad:
        return
    i = bad[0]
    key = f"plans.budgets[{i}]" if len(bad) == 1 else "plans.budgets"
    shown = budgets[i] if len(bad) == 1 else [budgets[j] for j in bad]
    cheap = [x for x in ("subset_only", "sink_window") if x in _candidate_methods(config)]
    raise ConfigError(
        key,
        f"{shown} is below the cheapest plan of model '{m}': its cheapest candidate "
        f"({' or '.join(cheap) or 'a method'} at s = {s} of the d = {d} keys of view '{view}') costs "
        f"{share:.4g} of exact attention, as a share of exact attention's cost on the view (the share "
        "plans.budgets is written in)",
        f"use budgets of at least {share:.4g}, or add a smaller subset size to reconstruction.subset_sizes",
    )


def _candidate_methods(config: dict) -> set[str]:
    """The methods a plan may give a head: the plug-in's estimators and peers that the reconstruction also measures."""
    ests = set(config["plugin"]["estimators"]) & set(config["reconstruction"]["estimators"])
    peers = set(plan.peers(config, "plugin")[0]) & set(plan.peers(config, "reconstruction")[0])
    return ests | peers


def _check_layer_groups(config: dict) -> None:
    """An explicit ``extraction.layer_groups`` splits the kept layers of each streamed model: more
    groups than layers cannot be made."""
    groups = plan.extraction_raw(config).get("layer_groups", "auto")
    if groups == "auto":
        return
    for m in config["run_models"]:
        if plan.store_mode(config, m) != "stream":
            continue
        n_layers, _ = plan.model_shape(config, m)
        L = plan.kept_layer_count(plan.model_spec(config, m).get("layers", "all"), n_layers)
        if L is not None and int(groups) > L:
            raise ConfigError(
                "extraction.layer_groups",
                f"{groups} groups, but the streamed model '{m}' keeps only {L} layers (a group holds at least one)",
                f"use layer_groups <= {L}, or layer_groups: auto (as few groups as stream_memory_gb allows)",
            )


def _check_extraction(config: dict) -> None:
    e, fit = config["extraction"], config["sampling"]["n_sequences"]["fit"]
    shards, batch, chunk = e["shards"], e["batch_size"], plan.chunk_sequences(config)
    # only an explicit chunk_sequences can fail the first and last check: auto divides batch_size and leaves two halves
    if batch % chunk:
        raise ConfigError(
            "extraction.batch_size",
            f"{batch} is not a multiple of extraction.chunk_sequences = {chunk} (a batch is one shard of whole chunks)",
            f"use a multiple of {chunk}, or extraction.chunk_sequences: auto",
        )
    for split, count in config["sampling"]["n_sequences"].items():
        if shards > count:
            raise ConfigError(
                "extraction.shards", f"{shards} shards but only {count} {split} passages", f"use at most {count} shards"
            )
    if sum(-(-((i + 1) * fit // shards - i * fit // shards) // chunk) for i in range(shards)) < 2:
        raise ConfigError(
            "extraction.chunk_sequences",
            f"{chunk} covers all {fit} fit passages of the shard in one "
            "chunk, so there are no two halves for the split-half statistics",
            f"use chunk_sequences: auto (or at most {max(1, fit // 2)}), or more shards",
        )


def _check_scaling(config: dict) -> None:
    s, models = Scaling.from_config(config), plan.scaling_models(config)
    for key, within, name in (
        ("models", config["run_models"], "run_models"),
        ("sample_models", models, "scaling.models"),
    ):
        asked = getattr(s, key)
        for i, m in enumerate([] if asked in ("auto", "first") else asked):
            if m not in within:
                raise ConfigError(
                    f"scaling.{key}[{i}]",
                    f"'{m}' is not in {name}",
                    f"use models from {name} ({', '.join(within)}), or auto" + (" or first" if key == "models" else ""),
                )
    for m in models:
        pos = config["models"][m].get("max_positions")
        if pos and m in plan.sample_models(config) and s.sample_length > pos:
            raise ConfigError(
                "scaling.sample_length",
                f"{s.sample_length} exceeds the {pos} positions of model '{m}'",
                f"use sample_length <= {pos}",
            )
        if pos and len([n for n in s.lengths if n <= pos]) < 2:
            raise ConfigError(
                "scaling.lengths",
                f"fewer than two lengths are within the {pos} positions of model "
                f"'{m}', so no trend against n can be fitted",
                f"add lengths <= {pos}",
            )


def _check_views(config: dict) -> None:
    views = Eigen.from_config(config).views
    if views == "auto":
        return
    for m in config["run_models"]:
        if not all(View(v, 2).allowed(config["models"][m]["causal"]) for v in views):
            raise ConfigError(
                "eigen.views",
                f"view 'all' is undefined for the causal model '{m}' (keys after each query are masked)",
                "use views: auto, or [prefix]",
            )


def _smallest_view(config: dict, views_of) -> tuple[int, str, str]:
    """(d, model, view) of the view with the fewest keys among the views that run (``views_of``: a
    run model's views), so a bound it gives holds for every view, and following it cannot fail again."""
    n = config["sampling"]["seq_len"]
    views = [(plan.view_dim(v, n), m, v) for m in config["run_models"] for v in views_of(m)]
    return min(views, key=lambda t: t[0])


def _check_overlap(config: dict) -> None:
    pairs = Overlap.from_config(config).cross_pairs
    for i, (a, b) in enumerate(plan.cross_pairs(config)):
        for j, m in enumerate((a, b)):
            if m not in config["run_models"]:
                raise ConfigError(
                    f"overlap.cross_pairs[{i}][{j}]",
                    f"unknown model '{m}'",
                    f"use models from run_models: {', '.join(config['run_models'])}",
                )
        if a == b:
            raise ConfigError(
                f"overlap.cross_pairs[{i}]",
                f"pairs a model with itself ('{a}')",
                "within-model overlap is always computed; list two different models",
            )
    if pairs != "auto" and len({tuple(p) for p in pairs}) != len(pairs):
        raise ConfigError("overlap.cross_pairs", "lists a pair twice", "list each pair once")


def _check_reconstruction(config: dict) -> None:
    if "raw" not in Eigen.from_config(config).variants:
        raise ConfigError(
            "eigen.variants",
            "reconstruction fits on the 'raw' row spectra, which are not computed",
            "add raw to eigen.variants",
        )
    prefix_models = plan.prefix_models(config)
    if "other_model" in plan.transfers(config) and len(prefix_models) < 2:  # only an explicit list: auto adapts
        raise ConfigError(
            "reconstruction.transfer",
            "lists other_model, but fewer than two models are analysed in "
            f"the prefix view ({', '.join(prefix_models) or 'none'}), so there is no other model",
            "add a second model to run_models, drop other_model from reconstruction.transfer, or use transfer: auto",
        )
    held = config["sampling"]["n_sequences"]["heldout"]
    if config["plugin"]["n_sequences"] > held:
        raise ConfigError(
            "plugin.n_sequences",
            f"{config['plugin']['n_sequences']} exceeds the {held} held-out passages",
            f"use at most {held}, or raise sampling.n_sequences.heldout",
        )


def _check_training(config: dict) -> None:
    t = config["training"]
    if (m := t["model"])["d_model"] % m["heads"]:
        raise ConfigError(
            "training.model.d_model",
            f"{m['d_model']} is not divisible by heads = {m['heads']}",
            "use a d_model that is a multiple of heads",
        )
    for key in ("eval_every", "checkpoint_every"):
        if t[key] % t["log_every"]:
            raise ConfigError(
                f"training.{key}",
                f"{t[key]} is not a multiple of log_every = {t['log_every']}",
                f"use a multiple of {t['log_every']}",
            )
    if t["vocab"] == "minilm" and "minilm" not in config["models"]:
        raise ConfigError(
            "training.vocab",
            "'minilm' needs the minilm model defined under `models:`",
            "use vocab: wordpiece, or define models.minilm",
        )


# ------------------------------------------------------------------------- in the rules, with data


def check_model_facts(facts_cfg: ModelFacts, facts: dict) -> None:
    """After the equivalence probe, before any score is written (extraction rule): the model's
    layers and causality agree with what the config says of it (``facts_cfg``, from
    :meth:`Extraction.facts`). (A seq_len beyond the model's positions is refused at parse time
    when `max_positions` is set, and by extraction itself otherwise.)"""
    model, layers, causal = facts_cfg.model, facts_cfg.layers, facts_cfg.causal
    for key, said in (("n_layers", facts_cfg.n_layers), ("heads", facts_cfg.heads)):
        if said is not None and said != facts[key]:
            raise ConfigError(
                f"models.{model}.{key}",
                f"is {said}, but the model has {facts[key]} "
                f"{'layers' if key == 'n_layers' else 'query heads per layer'}: the score-store sizes "
                "stated before the run were wrong",
                f"set {key}: {facts[key]}, or leave it out",
            )
    if layers != "all":
        bad = [x for x in layers if x >= facts["n_layers"]]
        if bad:
            raise ConfigError(
                f"models.{model}.layers",
                f"layer(s) {bad} out of range for a model with {facts['n_layers']} layers",
                f"use 'all' or indices in 0..{facts['n_layers'] - 1}",
            )
    if causal is not None and bool(causal) != facts["causal"]:
        raise ConfigError(
            f"models.{model}.causal",
            f"is {causal}, but the model's attention masks are "
            f"{facts['mask_kinds']}, so it is {'causal' if facts['causal'] else 'not causal'} "
            "(every layer hiding the keys after each query)",
            f"set causal: {str(facts['causal']).lower()}",
        )


def check_store_room(model: str, path, nbytes: int) -> None:
    """Before a score store is written (extraction rule, once the probe has fixed its layers, heads
    and dtype): its ``nbytes`` fit the free disk at ``path``, less the headroom
    (:func:`eigenattn.storage.sizes.room`). The plan checks every store before any job runs
    (:func:`eigenattn.config.disk.check_room`); this check covers a model whose size the config
    does not state, ``dtype: auto`` storing float32, and a disk that filled up meanwhile."""
    free = sizes.free_bytes(path)
    if nbytes > sizes.room(free):
        raise ConfigError(
            f"models.{model}.layers",
            f"the score store {path} needs {sizes.human(nbytes)}, but its disk has {sizes.human(free)} "
            f"free ({sizes.human(sizes.room(free))} after the headroom)",
            f"{disk.FIX.format(model=model)}; or free disk",
        )
