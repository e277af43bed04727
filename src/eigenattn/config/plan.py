"""Planning: what the workflow runs for a config (docs/method.md §2, §5, §8). Pure functions of
the validated config dict; the Snakefile builds its targets from them."""

from __future__ import annotations

from eigenattn.config.schema import enum
from eigenattn.config.sections import Eigen, Overlap, Scaling
from eigenattn.config.views import View, allowed_views
from eigenattn.storage import sizes


def model_views(config: dict, name: str) -> list[str]:
    """The eigen views of a model: ``all`` and ``prefix`` for bidirectional models, ``prefix`` for
    causal ones (``eigen.views: auto``), or the configured list."""
    causal = bool(model_spec(config, name)["causal"])
    views = Eigen.from_config(config).views
    if views == "auto":
        return allowed_views(causal)
    return list(views)


def view_dim(view: str, seq_len: int) -> int:
    """d, the keys of a view."""
    return View(view, seq_len).d


def plugin_view(config: dict, name: str) -> str:
    """The view whose statistics the plug-in evaluation uses: 'all' when analysed, else 'prefix'."""
    views = model_views(config, name)
    return "all" if "all" in views else views[0]


def cross_pairs(config: dict) -> list[tuple[str, str]]:
    """The model pairs compared across models (prefix view)."""
    pairs = Overlap.from_config(config).cross_pairs
    if pairs == "auto":
        ms = config["run_models"]
        return [(a, b) for i, a in enumerate(ms) for b in ms[i + 1 :]]
    return [tuple(p) for p in pairs]


def prefix_models(config: dict) -> list[str]:
    """The run models analysed in the prefix view (the view models are compared in)."""
    return [m for m in config["run_models"] if "prefix" in model_views(config, m)]


def fetched_models(config: dict) -> list[str]:
    """The models under ``models:`` that the workflow fetches: the run models, and minilm when the
    training vocabulary is minilm's (``training.vocab: minilm``)."""
    models = list(config["run_models"])
    if config["training"]["vocab"] == "minilm" and "minilm" not in models:
        models.append("minilm")
    return models


def transfers(config: dict) -> list[str]:
    """The transfer rows of the reconstruction (``reconstruction.transfer``). auto: every transfer
    the run can do: adjacent_layer and farthest_layer, and other_model when at least two run models
    are analysed in the prefix view. An explicit list is kept as written (and checked)."""
    t = config["reconstruction"]["transfer"]
    if t != "auto":
        return list(t)
    two = len(prefix_models(config)) >= 2
    return [k for k in enum("reconstruction.transfer") if k != "other_model" or two]


def peers(config: dict, section: str) -> tuple[list[str], bool]:
    """The peers of ``reconstruction`` or ``plugin`` (``<section>.peers``) and whether the list was
    written out (an explicit nystrom is refused where it cannot work; auto skips it there)."""
    p = config[section].get("peers", "auto")
    if p == "auto":
        return list(enum("reconstruction.peers")), False
    return list(p), True


def reconstruction(config: dict) -> dict:
    """The ``reconstruction`` section with its auto values resolved (what the reconstruction rule
    and script are given)."""
    return {**config["reconstruction"], "transfer": transfers(config)}


def other_models(config: dict, name: str, view: str) -> list[str]:
    """Models whose statistics a model's reconstruction transfers from (prefix view only)."""
    if view != "prefix" or "other_model" not in transfers(config):
        return []
    return [m for m in prefix_models(config) if m != name]


CHUNK_MAX = 8  # sequences per chunk when nothing forces fewer (the eigen stage's unit of reading)


def chunk_sequences(config: dict) -> int:
    """Sequences per chunk of the score store (``extraction.chunk_sequences``). auto: the largest
    c <= 8 that divides extraction.batch_size (a batch is whole chunks) and is at most half the fit
    passages, so the split-half statistics have two halves of near-equal size: 8 at the default
    batch_size 8 and fit >= 16, 4 for fit 8 to 15, 2 for fit 4 to 7, 1 for fit 2 or 3. An
    explicit value is kept as written (and checked)."""
    e = config["extraction"]
    if e["chunk_sequences"] != "auto":
        return int(e["chunk_sequences"])
    limit = min(CHUNK_MAX, max(1, config["sampling"]["n_sequences"]["fit"] // 2))
    return max(c for c in range(1, limit + 1) if e["batch_size"] % c == 0)


def extraction(config: dict) -> dict:
    """The ``extraction`` section with its auto values resolved (what the extraction rule is given)."""
    return {**config["extraction"], "chunk_sequences": chunk_sequences(config)}


def trained_run(config: dict) -> dict:
    """The training run whose encoder is analysed and fine-tuned: the first seed's exact, scratch."""
    return {
        "mode": "scratch",
        "tvariant": "exact",
        "s": config["sampling"]["seq_len"],
        "seed": config["training"]["seeds"][0],
    }


def model_spec(config: dict, name: str) -> dict:
    """A model's entry; the trained encoder (``training.analysis_model``) is a bidirectional model
    made by the training stage."""
    if name == config["training"]["analysis_model"]:
        return {
            "source": "training",
            "run": trained_run(config),
            "causal": False,
            "max_positions": config["sampling"]["seq_len"],
            "layers": "all",
        }
    return config["models"][name]


# Keys of a model entry that describe its size for planning (the score stores' sizes). They change
# no fetched file and no score, so they are left out of the params the rules record.
SHAPE_KEYS = ("n_layers", "heads")


def recorded_spec(config: dict, name: str) -> dict:
    """A model's entry as the fetch and extraction rules record it: without :data:`SHAPE_KEYS`, so
    that declaring them re-runs nothing, and with its keys sorted at every level, so that the order
    the config files were merged in (``--configfile tests/config.yaml`` against
    ``--configfile config.yaml tests/config.yaml``) re-runs nothing either: Snakemake compares
    recorded params in order."""
    spec = model_spec(config, name)
    return _sorted({k: spec[k] for k in spec if k not in SHAPE_KEYS})


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value


def model_shape(config: dict, name: str) -> tuple[int | None, int | None]:
    """(layers in the model, query heads per layer) as known before the model is fetched: the
    trained encoder's from ``training.model``, another model's from ``models.<name>.n_layers`` and
    ``models.<name>.heads``; None where the config does not say (the model's config.json is read
    only by the jobs that fetch and extract it)."""
    if name == config["training"]["analysis_model"]:
        m = config["training"]["model"]
        return int(m["layers"]), int(m["heads"])
    spec = config["models"][name]
    return spec.get("n_layers"), spec.get("heads")


def kept_layer_count(layers, n_layers: int | None) -> int | None:
    """How many layers a ``layers`` setting keeps (``all``, a list, or ``{"of": ..., "at_most": k}``,
    as :func:`eigenattn.capture.extract.resolve_layers` resolves them); None where that needs the
    model's layer count and it is unknown."""
    if isinstance(layers, dict):
        base = kept_layer_count(layers["of"], n_layers)
        return None if base is None else min(int(layers["at_most"]), base)
    if layers in (None, "all"):
        return n_layers
    return len({int(x) for x in layers})


def training_sizes(config: dict, mode: str) -> list[int]:
    """The subset sizes of a mode: ``training.subset_sizes`` is one list for every mode, or a
    mapping from mode to its list (a mode it leaves out trains no approximate variant)."""
    sizes = config["training"]["subset_sizes"]
    return list(sizes.get(mode, [])) if isinstance(sizes, dict) else list(sizes)


def training_runs(config: dict) -> list[dict]:
    """Every training run: in each mode, exact and the uniform floor for each seed (s = seq_len, all
    keys), and every variant × subset size of the mode × seed. Every run of a seed shares its
    initialisation (where the shapes allow), batch order and masks: the comparisons are paired."""
    t = config["training"]
    n = config["sampling"]["seq_len"]
    runs = []
    for mode in t["modes"]:
        refs = ("exact", "uniform")
        runs += [{"mode": mode, "tvariant": v, "s": n, "seed": seed} for v in refs for seed in t["seeds"]]
        runs += [
            {"mode": mode, "tvariant": v, "s": s, "seed": seed}
            for v in t["variants"]
            for s in training_sizes(config, mode)
            for seed in t["seeds"]
        ]
    return runs


def scaling_lengths_within(config: dict, model: str) -> list[int]:
    """The lengths of the length sweep within a model's positions."""
    pos = model_spec(config, model).get("max_positions")
    return [int(n) for n in Scaling.from_config(config).lengths if not pos or int(n) <= pos]


def scaling_models(config: dict) -> list[str]:
    """The models of the length sweep (``scaling.models``). auto: every run model, first: the first
    run model; either leaves out a model whose positions hold fewer than two of scaling.lengths (no
    trend to fit; :func:`notes` says so). An explicit list is kept as written (and checked)."""
    m = Scaling.from_config(config).models
    if m not in ("auto", "first"):
        return list(m)
    fit = [x for x in config["run_models"] if len(scaling_lengths_within(config, x)) >= 2]
    return fit[:1] if m == "first" else fit


def sample_models(config: dict) -> list[str]:
    """The models of the sample sweep (``scaling.sample_models``; auto: the first scaling model)."""
    m = Scaling.from_config(config).sample_models
    return scaling_models(config)[:1] if m == "auto" else list(m)


def length_sequences(config: dict) -> int:
    """N of the length sweep (``scaling.length_sequences``; auto: the main run's fit sequences)."""
    N = Scaling.from_config(config).length_sequences
    return int(config["sampling"]["n_sequences"]["fit"] if N == "auto" else N)


def scaling_points(config: dict, model: str) -> dict[str, list[tuple[int, int]]]:
    """A model's (n, N) grid of the scaling study: the length sweep at ``length_sequences`` (lengths
    beyond the model's positions left out), and the sample sweep at ``scaling.sample_length`` for
    the sample-sweep models; ``full`` lists the points whose whole blocks are analysed."""
    s = Scaling.from_config(config)
    pos = model_spec(config, model).get("max_positions") or max(s.lengths)
    lengths = [(int(n), length_sequences(config)) for n in s.lengths if int(n) <= pos]
    samples = [(int(s.sample_length), int(N)) for N in s.samples] if model in sample_models(config) else []
    return {"all": sorted(set(lengths) | set(samples)), "full": sorted(set(samples))}


def scaling_chunking(config: dict, N: int) -> tuple[int, int]:
    """(chunk_sequences, batch_size) of a scaling grid point with N sequences: chunks small enough
    that even a small N has two halves, and a batch of whole chunks."""
    e = extraction(config)
    chunk = min(e["chunk_sequences"], max(1, int(N) // 2))
    return chunk, e["batch_size"] if chunk == e["chunk_sequences"] else chunk


def scaling_layers(config: dict, model: str):
    """The layers a model's scaling stores keep: at most ``scaling.max_layers``, evenly spread over
    its analysed layers (see :func:`eigenattn.capture.extract.resolve_layers`)."""
    layers = model_spec(config, model).get("layers", "all")
    k = Scaling.from_config(config).max_layers
    return layers if k is None else {"of": layers, "at_most": int(k)}


def is_main_point(config: dict, model: str, n: int, N: int) -> bool:
    """Whether a grid point is the main run (same length and fit sequences, and every layer kept):
    its outputs are reused."""
    return (
        int(n) == config["sampling"]["seq_len"]
        and int(N) == config["sampling"]["n_sequences"]["fit"]
        and scaling_layers(config, model) == model_spec(config, model).get("layers", "all")
    )


def notes(config: dict) -> list[str]:
    """One line for each default that adapted to this run (printed when the workflow starts)."""
    out = []
    if config["reconstruction"]["transfer"] == "auto" and "other_model" not in transfers(config):
        out.append(
            f"reconstruction.transfer: auto -> {', '.join(transfers(config))} (other_model needs two run "
            f"models in the prefix view; this run has {', '.join(prefix_models(config)) or 'none'})"
        )
    chunk = chunk_sequences(config)
    if config["extraction"]["chunk_sequences"] == "auto" and chunk != CHUNK_MAX:
        out.append(
            f"extraction.chunk_sequences: auto -> {chunk} (at most half of the "
            f"{config['sampling']['n_sequences']['fit']} fit passages, dividing batch_size "
            f"{config['extraction']['batch_size']})"
        )
    if (asked := Scaling.from_config(config).models) in ("auto", "first"):
        left = [m for m in config["run_models"] if len(scaling_lengths_within(config, m)) < 2]
        if left:
            out.append(
                f"scaling.models: {asked} leaves out {', '.join(left)} (fewer than two "
                "of scaling.lengths within its max_positions)"
            )
        if not scaling_models(config):
            out.append("scaling: no run model can be swept against the length; the scaling study is skipped")
    groups = extraction_raw(config).get("layer_groups", "auto")
    if groups != "auto":
        # an explicit count beyond a run model's layers is refused (validation); the trained encoder
        # and the scaling points keep fewer layers than the run models, and take fewer groups
        trained = config["training"]["analysis_model"]
        L = kept_layer_count("all", model_shape(config, trained)[0])
        if training_runs(config) and store_mode(config, trained) == "stream" and L is not None and int(groups) > L:
            out.append(f"extraction.layer_groups: {groups} -> {L} for the trained encoder {trained} ({L} layers)")
        for m in scaling_models(config):
            streamed = [p for p in scaling_points(config, m)["all"] if scaling_point_streamed(config, m, *p)]
            L = kept_layer_count(scaling_layers(config, m), model_shape(config, m)[0])
            if streamed and L is not None and int(groups) > L:
                out.append(
                    f"extraction.layer_groups: {groups} -> {L} for the streamed scaling points of {m} "
                    f"(they keep {L} layers, scaling.max_layers; a group holds at least one)"
                )
    return out


def main_store_bytes(config: dict, name: str) -> int | None:
    """Bytes of a model's main-run score stores (fit and held-out, every shard), as
    :mod:`eigenattn.config.disk` states them (float16 for ``dtype: auto``); None where the config
    does not give the model's layers and heads."""
    n_layers, heads = model_shape(config, name)
    L = kept_layer_count(model_spec(config, name).get("layers", "all"), n_layers)
    if L is None or heads is None:
        return None
    e = extraction_raw(config)
    dtype = "float16" if e["dtype"] == "auto" else e["dtype"]
    n, chunk = config["sampling"]["seq_len"], chunk_sequences(config)
    total = 0
    for split, N in config["sampling"]["n_sequences"].items():
        for i in range(e["shards"]):
            Ni = (i + 1) * N // e["shards"] - i * N // e["shards"]
            total += sizes.score_store_bytes(Ni, L, heads, n, dtype, chunk, e["batch_size"])
    return total


def store_mode(config: dict, name: str) -> str:
    """How a model's main run keeps its scores: ``scores`` (stored, the score-store route) or
    ``stream`` (fit-split moments accumulated in the forward pass, held-out scores recomputed;
    docs/method.md §14). ``extraction.store: auto`` streams a model whose score stores would
    exceed ``extraction.store_budget_gb``; a model whose size the config does not give is stored
    (its size is checked against the disk by the extraction rule)."""
    mode = extraction_raw(config).get("store", "auto")
    if mode != "auto":
        return mode
    nbytes = main_store_bytes(config, name)
    budget = float(extraction_raw(config).get("store_budget_gb", 50)) * 1e9
    return "stream" if nbytes is not None and nbytes > budget else "scores"


def layer_groups(config: dict, name: str, n: int | None = None, layers=None) -> int:
    """Layer groups of a streamed model: each is its own job, whose row moments (held in memory and
    written) take at most ``extraction.stream_memory_gb``; 1 where the config does not give the
    model's layers and heads. An explicit ``extraction.layer_groups`` is taken as it is: beyond a
    run model's kept layers it is refused (:mod:`eigenattn.config.validation`), and the trained
    encoder and the scaling points, which keep fewer layers, take one group per layer (:func:`notes`
    says so). ``n`` and ``layers``: a scaling grid point's length and layers."""
    e = extraction_raw(config)
    groups = e.get("layer_groups", "auto")
    n_layers, heads = model_shape(config, name)
    layers = model_spec(config, name).get("layers", "all") if layers is None else layers
    L = kept_layer_count(layers, n_layers)
    if groups != "auto":
        return int(groups) if L is None else min(int(groups), L)
    if L is None or heads is None:
        return 1
    n = config["sampling"]["seq_len"] if n is None else int(n)
    per_layer = sizes.moment_layer_bytes(heads, [view_dim(v, n) for v in model_views(config, name)])
    budget = float(e.get("stream_memory_gb", 4)) * 1e9
    per_job = max(1, int(budget // per_layer))  # layers whose moments fit the budget (at least one)
    return max(1, sizes.ceil_div(L, per_job))


def scaling_point_streamed(config: dict, model: str, n: int, N: int) -> bool:
    """Whether a length-sweep point is streamed: as the main run under ``extraction.store``
    (``auto``: when its score store would exceed ``extraction.store_budget_gb``). The sample
    sweep's points, whose whole blocks are analysed, are always stored."""
    if (int(n), int(N)) in scaling_points(config, model)["full"]:
        return False
    e = extraction_raw(config)
    if e["store"] != "auto":
        return e["store"] == "stream"
    n_layers, heads = model_shape(config, model)
    L = kept_layer_count(scaling_layers(config, model), n_layers)
    if L is None or heads is None:
        return False
    dtype = "float16" if e["dtype"] == "auto" else e["dtype"]
    chunk, batch = scaling_chunking(config, N)
    return sizes.score_store_bytes(int(N), L, heads, int(n), dtype, chunk, batch) > float(e["store_budget_gb"]) * 1e9


def fit_halves_split(config: dict, counts: list[int] | None = None, chunk: int | None = None) -> int:
    """The first fit sequence of half b, where the stored route splits the fit sequences (at the
    chunk boundary nearest the middle, chunks restarting in each shard). ``counts``: the sequences
    of each shard, ``chunk``: sequences per chunk (default: the main run's)."""
    e = extraction_raw(config)
    if counts is None:
        N, shards = config["sampling"]["n_sequences"]["fit"], e["shards"]
        counts = [(i + 1) * N // shards - i * N // shards for i in range(shards)]
    chunk = chunk_sequences(config) if chunk is None else int(chunk)
    chunks = [min(chunk, c - s) for c in counts for s in range(0, c, chunk)]
    if len(chunks) < 2:
        return sum(chunks)
    return sum(chunks[: half_chunk_index(chunks)])


def half_chunk_index(chunks) -> int:
    """The chunk that starts half b: the boundary nearest the middle, leaving each half at least
    one chunk (the one rule of both routes: :func:`eigenattn.spectra.moments.half_block_index`
    and :func:`fit_halves_split`). ``chunks``: sequences per chunk, at least two chunks."""
    edges = [sum(chunks[: i + 1]) for i in range(len(chunks))]
    i = min(range(len(edges)), key=lambda j: (abs(edges[j] - edges[-1] / 2), j)) + 1
    return min(max(i, 1), len(chunks) - 1)


def shard_first(config: dict, split: str, shard: int) -> int:
    """The index of a shard's first sequence within its split."""
    N, shards = config["sampling"]["n_sequences"][split], extraction_raw(config)["shards"]
    return shard * N // shards


def extraction_raw(config: dict) -> dict:
    """The ``extraction`` section with the defaults of the keys that streamed mode added."""
    return {
        "store": "auto",
        "store_budget_gb": 50,
        "stream_memory_gb": 4,
        "layer_groups": "auto",
        **config["extraction"],
    }
