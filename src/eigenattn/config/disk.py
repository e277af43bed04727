"""The score stores a config writes and their size on disk, known from the plan before any job
runs: stated when the workflow is parsed and when it starts, and refused when they cannot fit the
free disk of the results folder (README, Configuration).

A store's size is :func:`eigenattn.storage.sizes.score_store_bytes` of its sequences, kept layers,
query heads, length and dtype. Layers and heads come from the config (:func:`plan.model_shape`);
where it does not give them, the size is unknown until the model is fetched, and the extraction
rule checks it before writing (:func:`eigenattn.config.validation.check_store_room`).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eigenattn.config import plan
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


MOMENTS_FIX = (
    "write fewer streamed moments: keep fewer layers (models.{model}.layers: a list of layer indices), "
    "fewer eigen.views, or a shorter sampling.seq_len (a view's moments grow as its square){shards}"
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


@dataclass(frozen=True)
class MomentStore:
    """One streamed-moments store of the run: layer group ``group`` of a streamed model's fit shard
    ``shard`` (``part`` fit, rule ``stream_moments``) or of a streamed scaling grid point (n, N)
    (``part`` scaling, rule ``scaling_stream_moments``). ``layers`` (the group's) and ``heads`` are
    None where the config does not give them; ``dims``: the keys of each view."""

    model: str
    part: str
    group: int
    shard: int
    n: int
    N: int
    layers: int | None
    heads: int | None
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int | None:
        if self.layers is None or self.heads is None:
            return None
        return sizes.moment_store_bytes(self.layers, self.heads, list(self.dims))

    def path(self, results) -> Path:
        """Where the rule writes it, under the results folder ``results``."""
        if self.part == "scaling":
            return Path(
                results, "scaling", "moments", self.model, f"n{self.n}", f"N{self.N}", f"group-{self.group}.zarr"
            )
        return Path(results, "moments", self.model, f"group-{self.group}", f"shard-{self.shard}.zarr")


def _main_models(config: dict) -> list[str]:
    """The models of the main run: the run models, and the trained encoder when a training variant
    reads its maps."""
    main = list(config["run_models"])
    if any(r["tvariant"] in USES_MAPS for r in plan.training_runs(config)):
        main.append(config["training"]["analysis_model"])
    return main


def group_sizes(L: int, groups: int) -> list[int]:
    """Kept layers of each layer group (contiguous and as even as they can be, as
    :func:`eigenattn.spectra.streamed.layer_group` cuts them)."""
    return [(g + 1) * L // groups - g * L // groups for g in range(groups)]


def moment_stores(config: dict) -> list[MomentStore]:
    """Every streamed-moments store the default target writes: each streamed model's layer groups ×
    fit shards, and each streamed scaling grid point's layer groups (except the main run's point)."""
    e = plan.extraction_raw(config)
    n = config["sampling"]["seq_len"]
    out = []
    for m in _main_models(config):
        if plan.store_mode(config, m) != "stream":
            continue
        n_layers, heads = plan.model_shape(config, m)
        L = plan.kept_layer_count(plan.model_spec(config, m).get("layers", "all"), n_layers)
        G = plan.layer_groups(config, m)
        dims = tuple(plan.view_dim(v, n) for v in plan.model_views(config, m))
        for g in range(G):
            Lg = None if L is None else group_sizes(L, G)[g]
            for i, Ni in enumerate(shard_sizes(config["sampling"]["n_sequences"]["fit"], e["shards"])):
                out.append(MomentStore(m, "fit", g, i, n, Ni, Lg, heads, dims))
    for m in plan.scaling_models(config):
        layers = plan.scaling_layers(config, m)
        n_layers, heads = plan.model_shape(config, m)
        L = plan.kept_layer_count(layers, n_layers)
        for ni, Ni in plan.scaling_points(config, m)["all"]:
            if plan.is_main_point(config, m, ni, Ni) or not plan.scaling_point_streamed(config, m, ni, Ni):
                continue
            G = plan.layer_groups(config, m, ni, layers)
            dims = tuple(plan.view_dim(v, ni) for v in plan.model_views(config, m))
            for g in range(G):
                Lg = None if L is None else group_sizes(L, G)[g]
                out.append(MomentStore(m, "scaling", g, 0, ni, Ni, Lg, heads, dims))
    return out


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
    for m in _main_models(config):
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


def _key(config: dict, stores: list) -> str:
    """The key to name for stores that do not fit: the scaling study's when its stores are the
    larger part; for streamed moments the streamed model's layers (or extraction.shards, when each
    of several fit shards writes every layer's moments); else extraction.store, whose ``stream``
    (or ``auto``) keeps no score at all."""
    scaling = sum(s.nbytes or 0 for s in stores if s.part == "scaling")
    if 2 * scaling > sum(s.nbytes or 0 for s in stores):
        return "scaling.max_layers"
    moments = [s for s in stores if isinstance(s, MomentStore)]
    if 2 * sum(s.nbytes or 0 for s in moments) > sum(s.nbytes or 0 for s in stores):
        if plan.extraction_raw(config)["shards"] > 1:
            return "extraction.shards"
        per_model: dict[str, int] = {}
        for s in moments:
            per_model[s.model] = per_model.get(s.model, 0) + (s.nbytes or 0)
        return f"models.{max(per_model, key=per_model.get)}.layers"
    return "extraction.store"


def check_stream_memory(config: dict) -> None:
    """Before any job: every layer group of a streamed model (and of a streamed scaling point) fits
    ``extraction.stream_memory_gb`` (:func:`eigenattn.storage.sizes.check_group_memory`): one
    layer alone must fit, and an explicit ``extraction.layer_groups`` must make groups that fit.
    A model whose layers and heads the config does not give is checked by its job instead."""
    budget = plan.extraction_raw(config)["stream_memory_gb"]
    groups: dict[tuple, list[MomentStore]] = {}
    for s in moment_stores(config):
        groups.setdefault((s.model, s.part, s.n, s.N), []).append(s)
    for (model, _, _, _), stores in groups.items():
        s = stores[0]
        if s.layers is None or s.heads is None:
            continue
        per_layer = sizes.moment_layer_bytes(s.heads, list(s.dims))
        kept = sum(x.layers for x in stores if x.shard == 0)
        sizes.check_group_memory(model, per_layer, max(x.layers for x in stores), kept, budget)


def check_room(config: dict, stores: list[Store], exists: Callable[[Store], bool], where: str) -> str:
    """Refuse what the run still has to write when it cannot fit the free disk at ``where`` (the
    results folder): the score stores and the streamed moments (:func:`moment_stores`) not yet
    written must take at most :func:`eigenattn.storage.sizes.room` of it (all but 10%, and at least
    2 GB, kept free for the rest of the run's outputs). A store that exists is not counted (a
    finished run re-runs nothing): ``exists`` says so for a score store, a moments store is looked
    for under ``where``. Returns the line that states the room. Checks first that each streamed
    job's moments fit extraction.stream_memory_gb (:func:`check_stream_memory`)."""
    check_stream_memory(config)
    todo = [s for s in stores if not exists(s) and s.nbytes is not None]
    planned = moment_stores(config)
    streamed = [s for s in planned if s.nbytes is not None and not s.path(where).exists()]
    need_scores, need_moments = sum(s.nbytes for s in todo), sum(s.nbytes for s in streamed)
    need, free = need_scores + need_moments, sizes.free_bytes(where)
    moments = f" and {sizes.human(need_moments)} of streamed moments" if planned else ""
    line = (
        f"to write: {sizes.human(need_scores)} of score stores{moments}; free disk at {where}: "
        f"{sizes.human(free)} ({sizes.human(sizes.room(free))} usable after the headroom)"
    )
    if not (todo or streamed) or need <= sizes.room(free):
        return line
    per_model: dict[str, int] = {}
    for s in [*todo, *streamed]:
        per_model[s.model] = per_model.get(s.model, 0) + s.nbytes
    big = max(per_model, key=per_model.get)
    key = _key(config, [*todo, *streamed])
    if need_moments > need_scores:
        shards = plan.extraction_raw(config)["shards"]
        per_shard = sum(s.nbytes for s in streamed if s.model == big and s.part == "fit" and s.shard == 0)
        fix = MOMENTS_FIX.format(
            model=big,
            shards=(
                f", or fewer extraction.shards (each of the {shards} fit shards writes every layer's "
                f"moments, {sizes.human(per_shard)} for {big})"
                if shards > 1
                else ""
            ),
        )
    else:
        fix = FIX.format(model=big)
    scaling_moments = sum(s.nbytes for s in streamed if s.part == "scaling")
    if key.startswith("scaling"):
        fix += "; fewer scaling.models, a smaller scaling.max_layers, scaling.lengths or scaling.samples"
    elif scaling_moments:
        fix += (
            f"; the scaling study's streamed moments ({sizes.human(scaling_moments)}): a smaller "
            "scaling.max_layers or fewer scaling.lengths"
        )
    if len(config["run_models"]) > 1 and big in config["run_models"]:
        fix += f"; or drop {big} ({sizes.human(per_model[big])}) from run_models"
    what = "the score stores" if not streamed else "the streamed moments" if not todo else "the stores"
    raise ConfigError(
        key,
        f"{what} still to write need {sizes.human(need)} ({sizes.human(need_scores)} of score stores, "
        f"{sizes.human(need_moments)} of streamed moments; the largest part: {big}, "
        f"{sizes.human(per_model[big])}), but the disk of {where} has {sizes.human(free)} free and the run "
        f"keeps {sizes.human(free - sizes.room(free))} of it as headroom",
        f"{fix}; or run it on a larger disk, from any folder, with every file by its full path: "
        f"{larger_disk_command()}",
    )


# ------------------------------------------------------------------ the command on a larger disk

LARGER_DISK = "/path/to/larger/disk"
"""The placeholder of :func:`larger_disk_command` for the working directory on the larger disk."""

SNAKEFILES = ("Snakefile", "snakefile", "workflow/Snakefile", "workflow/snakefile")  # snakemake's search order


def larger_disk_command(argv: list[str] | None = None, cwd=None, launch=None) -> str:
    """The command that runs this same invocation with its working directory (results/, logs/,
    .snakemake/) on another disk, :data:`LARGER_DISK`: ``snakemake -s SNAKEFILE --directory
    LARGER_DISK --configfile CONFIGS... OTHER_ARGS``, every file by its absolute path.

    ``--directory`` alone fails: the Snakefile's ``configfile: "config.yaml"`` is read from the
    working directory, so the new one lacks it ("Workflow defines configfile config.yaml but it is
    not present"), and with ``--configfile`` given only those files are read ("'corpora' is a
    required property"). So the config file the Snakefile read from this working directory comes
    first, then the ones given on the command line.

    ``argv``: the command line (default ``sys.argv`` of the snakemake process); ``cwd``: the
    working directory (default: the current one, which snakemake has changed to ``--directory``);
    ``launch``: where the command was run, for its relative paths (default: found from ``cwd``
    and a relative ``--directory``, else ``$PWD``, else ``cwd``)."""
    argv = list(sys.argv if argv is None else argv)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    prog = Path(argv[0]).name if argv else ""
    ours = bool(argv) and ("snakemake" in prog or argv[0].replace("\\", "/").endswith("snakemake/__main__.py"))
    args = argv[1:] if ours else []
    snakefile, directory, configs, rest = None, None, [], []
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in ("-s", "--snakefile", "-d", "--directory"):
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if name in ("-s", "--snakefile"):
                snakefile = value
            else:
                directory = value
        elif name in ("--configfile", "--configfiles"):
            if eq:
                configs.append(value)
            while i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1
                configs.append(args[i])
        else:
            rest.append(a)
        i += 1
    if launch is None:
        launch = cwd
        if directory and not os.path.isabs(directory):
            launch = next((p for p in [cwd, *cwd.parents] if (p / directory).resolve() == cwd.resolve()), cwd)
        elif directory and os.environ.get("PWD") and Path(os.environ["PWD"]).is_dir():
            launch = Path(os.environ["PWD"])
    launch = Path(launch)

    def full(p) -> str:
        return str(Path(p) if os.path.isabs(p) else (launch / p).resolve())

    if snakefile is None:
        snakefile = next((str(launch / f) for f in SNAKEFILES if (launch / f).is_file()), "Snakefile")
    snakefile = full(snakefile)
    configs = [full(c) for c in configs]
    directive = _configfile_directive(snakefile)
    if directive and (cwd / directive).is_file():
        read = str((cwd / directive).resolve())
        configs = [read, *[c for c in configs if c != read]]
    for j, a in enumerate(rest[:-1]):  # the folders of a profile, by their full path too
        if a in ("--profile", "--workflow-profile") and (launch / rest[j + 1]).exists():
            rest[j + 1] = full(rest[j + 1])
    cmd = ["snakemake", "-s", snakefile, "--directory", LARGER_DISK]
    if configs:
        cmd += ["--configfile", *configs]
    return shlex.join(cmd + rest)


def _configfile_directive(snakefile: str) -> str | None:
    """The path of the Snakefile's ``configfile:`` directive (read from the working directory)."""
    try:
        text = Path(snakefile).read_text()
    except OSError:
        return None
    m = re.search(r"^configfile:\s*[\"'](.+?)[\"']", text, re.M)
    return m.group(1) if m else None


def stream_lines(config: dict) -> list[str]:
    """One line per streamed model (extraction.store): why it is streamed, its layer groups and
    shards, and the bytes its row moments take (per job in memory, and written in all)."""
    lines = []
    e = plan.extraction_raw(config)
    for m in _main_models(config):
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
            written = sum(s.nbytes for s in moment_stores(config) if s.model == m and s.part == "fit")
            size = (
                f"row moments {sizes.human(sizes.ceil_div(L, groups) * per_layer)} per job, "
                f"{sizes.human(written)} written in all"
            )
        lines.append(
            f"{m}: streamed ({why}): {groups} layer group(s) × {shards} shard(s) of fit moments, {size}; "
            "held-out scores recomputed from the model"
        )
    return lines
