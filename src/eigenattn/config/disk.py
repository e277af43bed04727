"""The score stores a config writes and their size on disk, known from the plan before any job
runs: stated when the workflow is parsed and when it starts, and refused when they cannot fit the
free disk of the results folder (README, Configuration).

A store's size is :func:`eigenattn.storage.sizes.score_store_bytes` of its sequences, kept layers,
query heads, length and dtype. Layers and heads come from the config (:func:`plan.model_shape`);
where it does not give them, the size is unknown until the model is fetched, and the extraction
rule checks it before writing (:func:`eigenattn.config.validation.check_store_room`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eigenattn.config import plan
from eigenattn.config.schema import node
from eigenattn.config.settings import USES_MAPS
from eigenattn.errors import ConfigError
from eigenattn.storage import sizes

# ``extraction.dtype: auto`` stores float16 wherever the probe finds that its cast reproduces the
# probabilities (both default models, docs/models.md); a model where it does not stores float32,
# twice the size, and the extraction rule checks that store again before writing it.
AUTO_DTYPE = "float16"

FIX = (
    "stream the model's statistics instead of storing its scores (extraction.store: stream, or auto), "
    "keep fewer layers (models.{model}.layers: a list of layer indices), fewer sequences "
    "(sampling.n_sequences), or a shorter sampling.seq_len (the stores grow as its square)"
)


@dataclass(frozen=True)
class Store:
    """One score store of the run: a shard of a split (``part`` fit or heldout), or a grid point of
    the scaling study (``part`` scaling). ``layers`` and ``heads`` are None where the config does
    not give them."""

    model: str
    part: str
    shard: int
    n: int
    N: int
    layers: int | None
    heads: int | None
    dtype: str
    chunk: int
    batch: int

    @property
    def nbytes(self) -> int | None:
        if self.layers is None or self.heads is None:
            return None
        return sizes.score_store_bytes(self.N, self.layers, self.heads, self.n, self.dtype, self.chunk, self.batch)


def shard_sizes(N: int, shards: int) -> list[int]:
    """Sequences of each shard of a split of N (contiguous blocks, as the extraction cuts them)."""
    return [(i + 1) * N // shards - i * N // shards for i in range(shards)]


def score_stores(config: dict) -> list[Store]:
    """Every score store the default target writes: each run model's fit and held-out shards, the
    trained encoder's fit shards when a training variant reads its maps, and the scaling study's
    grid points (except the one that reuses the main run's stores)."""
    e = plan.extraction(config)
    dtype = AUTO_DTYPE if e["dtype"] == "auto" else e["dtype"]
    n = config["sampling"]["seq_len"]

    def kept(model, layers):
        n_layers, heads = plan.model_shape(config, model)
        return plan.kept_layer_count(layers, n_layers), heads

    out = []
    main = list(config["run_models"])
    if any(r["tvariant"] in USES_MAPS for r in plan.training_runs(config)):
        main.append(config["training"]["analysis_model"])
    for m in main:
        if plan.store_mode(config, m) == "stream":  # no score store: moments and token stores only
            continue
        L, H = kept(m, plan.model_spec(config, m).get("layers", "all"))
        splits = ["fit"] if m == config["training"]["analysis_model"] else ["fit", "heldout"]
        for split in splits:
            N = config["sampling"]["n_sequences"][split]
            for i, Ni in enumerate(shard_sizes(N, e["shards"])):
                out.append(Store(m, split, i, n, Ni, L, H, dtype, e["chunk_sequences"], e["batch_size"]))
    for m in plan.scaling_models(config):
        L, H = kept(m, plan.scaling_layers(config, m))
        for ni, Ni in plan.scaling_points(config, m)["all"]:
            if not plan.is_main_point(config, m, ni, Ni) and not plan.scaling_point_streamed(config, m, ni, Ni):
                out.append(Store(m, "scaling", 0, ni, Ni, L, H, dtype, *plan.scaling_chunking(config, Ni)))
    return out


def _group(stores: list[Store]) -> dict[tuple[str, str], list[Store]]:
    groups: dict[tuple[str, str], list[Store]] = {}
    for s in stores:
        groups.setdefault((s.model, s.part), []).append(s)
    return groups


def size_lines(config: dict, stores: list[Store]) -> list[str]:
    """One line per model and split (and per model's scaling study), then the total."""
    lines = []
    for (m, part), group in _group(stores).items():
        s = group[0]
        name = f"{m} {'scaling study' if part == 'scaling' else part}"
        if any(g.nbytes is None for g in group):
            missing = [f"models.{m}.{k}" for k, v in zip(plan.SHAPE_KEYS, (s.layers, s.heads)) if v is None]
            lines.append(
                f"{name}: size unknown before the model is fetched ({' and '.join(missing)} not set); "
                "the extraction rule checks it against the free disk before writing"
            )
            continue
        if part == "scaling":
            what = f"{len(group)} grid points, n up to {max(g.n for g in group)}, {s.layers} layers × {s.heads} heads"
        else:
            what = f"{sum(g.N for g in group)} sequences × {s.layers} layers × {s.heads} heads × {s.n}²"
        lines.append(f"{name}: {what} × {s.dtype} = {sizes.human(sum(g.nbytes for g in group))}")
    known = sum(s.nbytes for s in stores if s.nbytes is not None)
    dtype = config["extraction"]["dtype"]
    note = f" (extraction.dtype auto: {AUTO_DTYPE} assumed; float32 doubles it)" if dtype == "auto" else ""
    unknown = " plus the stores of unknown size" if any(s.nbytes is None for s in stores) else ""
    lines.append(f"score stores in all: {sizes.human(known)}{unknown}{note}")
    return lines


def _key(config: dict, stores: list[Store]) -> str:
    """The key to name for stores that do not fit: the scaling study's when its stores are the
    larger part, else the sampling value raised above its default, else run_models."""
    scaling = sum(s.nbytes or 0 for s in stores if s.part == "scaling")
    if 2 * scaling > sum(s.nbytes or 0 for s in stores):
        return "scaling.max_layers"
    if config["sampling"]["seq_len"] > node("sampling.seq_len")["default"]:
        return "sampling.seq_len"
    N = config["sampling"]["n_sequences"]
    if any(N[k] > node(f"sampling.n_sequences.{k}")["default"] for k in N):
        return "sampling.n_sequences"
    return "run_models"


def check_room(config: dict, stores: list[Store], exists: Callable[[Store], bool], where: str) -> str:
    """Refuse stores that cannot fit the free disk at ``where`` (the results folder): the stores
    not yet written must take at most :func:`eigenattn.storage.sizes.room` of it (all but 10%, and
    at least 2 GB, kept free for the rest of the run's outputs). A store that exists is not counted
    (a finished run re-runs nothing). Returns the line that states the room."""
    todo = [s for s in stores if not exists(s) and s.nbytes is not None]
    need, free = sum(s.nbytes for s in todo), sizes.free_bytes(where)
    line = (
        f"to write: {sizes.human(need)} of score stores; free disk at {where}: {sizes.human(free)} "
        f"({sizes.human(sizes.room(free))} usable after the headroom)"
    )
    if not todo or need <= sizes.room(free):
        return line
    per_model: dict[str, int] = {}
    for s in todo:
        per_model[s.model] = per_model.get(s.model, 0) + s.nbytes
    big = max(per_model, key=per_model.get)
    key = _key(config, todo)
    scaling = "; fewer scaling.models, a smaller scaling.max_layers, scaling.lengths or scaling.samples"
    fix = FIX.format(model=big) + (scaling if key.startswith("scaling") else "")
    if len(config["run_models"]) > 1 and big in config["run_models"]:
        fix += f"; or drop {big} ({sizes.human(per_model[big])}) from run_models"
    raise ConfigError(
        key,
        f"the score stores still to write need {sizes.human(need)} (the largest part: {big}, "
        f"{sizes.human(per_model[big])}), but the disk of {where} has {sizes.human(free)} free and the run "
        f"keeps {sizes.human(free - sizes.room(free))} of it as headroom",
        f"{fix}; or run on a larger disk (snakemake --directory)",
    )


def stream_lines(config: dict) -> list[str]:
    """One line per streamed model (extraction.store): why it is streamed, its layer groups and
    shards, and the bytes its row moments take (per job in memory, and written in all)."""
    lines = []
    e = plan.extraction_raw(config)
    main = list(config["run_models"])
    if any(r["tvariant"] in USES_MAPS for r in plan.training_runs(config)):
        main.append(config["training"]["analysis_model"])
    for m in main:
        if plan.store_mode(config, m) != "stream":
            continue
        stored = plan.main_store_bytes(config, m)
        why = (
            "extraction.store: stream"
            if e["store"] == "stream"
            else f"its score stores would take {sizes.human(stored)}, "
            f"over extraction.store_budget_gb {e['store_budget_gb']}"
        )
        groups, shards = plan.layer_groups(config, m), e["shards"]
        n_layers, heads = plan.model_shape(config, m)
        L = plan.kept_layer_count(plan.model_spec(config, m).get("layers", "all"), n_layers)
        if L is None or heads is None:
            size = "moment sizes unknown before the model is fetched"
        else:
            n = config["sampling"]["seq_len"]
            dims = [plan.view_dim(v, n) for v in plan.model_views(config, m)]
            per_layer = sizes.moment_layer_bytes(heads, dims)
            size = (
                f"row moments {sizes.human(sizes.ceil_div(L, groups) * per_layer)} per job, "
                f"{sizes.human(L * per_layer * shards)} written in all"
            )
        lines.append(
            f"{m}: streamed ({why}): {groups} layer group(s) × {shards} shard(s) of fit moments, {size}; "
            "held-out scores recomputed from the model"
        )
    return lines
