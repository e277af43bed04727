# Config validation and every input function. The other .smk files hold only rules.
#
# Paths: each output pattern is written once, in its rule; everything else refers to it as
# rules.<rule>.output and expands it. Planning (views, pairs, runs) comes from eigenattn.config.plan,
# checks from eigenattn.config.validation: both are functions of the config dict, so parsing the Snakefile
# reads no file but the config and the schema, and opens no socket.
import json
import sys
from pathlib import Path

from snakemake.utils import validate

from eigenattn.config import validation as config_layer
from eigenattn.config import plan
from eigenattn.errors import ConfigError
from eigenattn.config.schema import SCHEMA_FILE, enum

try:
    validate(config, str(SCHEMA_FILE))
except WorkflowError as e:
    error = config_layer.validation_error(e)
    if error is None:
        raise
    raise WorkflowError(
        f"invalid configuration: {config_layer.explain(error)}"
    ) from None
try:
    config_layer.check(config)
except ConfigError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None

MODELS = config["run_models"]
TRAINED = config["training"]["analysis_model"]
CORPUS = config["corpus"]
SPLITS = ["fit", "heldout"]
SHARDS = list(range(config["extraction"]["shards"]))
SEQ_LEN = config["sampling"]["seq_len"]
TRAIN = config["training"]
NOTEBOOKS = ["spectrum", "overlap", "reconstruction", "training", "summary"]
NOTEBOOKS += ["scaling"] if plan.scaling_models(config) else []
NOTEBOOK_DIR = Path(workflow.current_basedir) / ".." / ".." / "notebooks"
WHEEL_CACHE = "resources/wheels"


wildcard_constraints:
    model="|".join(sorted([*config["models"], TRAINED])),
    model_a="|".join(sorted(config["models"])),
    model_b="|".join(sorted(config["models"])),
    corpus="|".join(sorted(config["corpora"])),
    split="|".join(SPLITS),
    shard=r"\d+",
    view="|".join(enum("eigen.views")),
    variant="|".join(enum("eigen.variants")),
    mode="|".join(enum("training.modes")),
    tvariant="|".join(["exact", *enum("training.variants")]),
    name="|".join([*NOTEBOOKS, "scaling"]),
    s=r"\d+",
    seed=r"\d+",
    n=r"\d+",
    N=r"\d+",


def log_start():
    print(
        f"eigenattn: models {', '.join(MODELS)}; corpus {CORPUS}; seq_len {SEQ_LEN}; "
        f"n_sequences {config['sampling']['n_sequences']}; seed {config['seed']}"
    )
    for note in plan.notes(config):
        print(f"eigenattn: {note}")


# ------------------------------------------------------------------ models, corpus and scores


def model_spec(wildcards):
    return plan.model_spec(config, wildcards.model)


def corpus_spec(wildcards):
    return config["corpora"][wildcards.corpus]


def trained_model_dir():
    return expand(rules.train_run.output.model, **plan.trained_run(config))[0]


def model_dir(wildcards):
    """A fetched model's folder, or the trained encoder straight from its training run."""
    if wildcards.model == TRAINED:
        return trained_model_dir()
    return expand(rules.fetch_model.output[0], model=wildcards.model)[0]


def corpus_documents():
    return expand(rules.fetch_corpus.output[0], corpus=CORPUS)[0]


def passages():
    return expand(rules.sample_passages.output[0], corpus=CORPUS)[0]


def score_shards(model, split):
    return expand(
        rules.extract_scores.output[0], model=model, split=split, shard=SHARDS
    )


def fit_shards(wildcards):
    return score_shards(wildcards.model, "fit")


def heldout_shards(wildcards):
    return score_shards(wildcards.model, "heldout")


def sampling_params(wildcards):
    return {"seed": config["seed"], **config["sampling"]}


def gram_mem_mb(wildcards, input, threads, attempt):
    """Peak memory of a full-matrix job (eigenattn.spectra.full_plan.stores_memory_mb): eigen.gram_memory_mb
    plus each head's eigenproblem work, from the store's shape once it exists (a generous guess
    before)."""
    from eigenattn.spectra.full_plan import stores_memory_mb

    e = config["eigen"]
    mb = stores_memory_mb(
        list(input),
        wildcards.view,
        bool(plan.model_spec(config, wildcards.model).get("causal")),
        e["gram_memory_mb"],
        threads,
        e["full_route"],
        rank=e["full_rank"],
        guess_n_sequences=int(
            getattr(wildcards, "N", 4 * config["sampling"]["n_sequences"]["fit"])
        ),
        guess_seq_len=int(getattr(wildcards, "n", config["sampling"]["seq_len"])),
    )
    return int(attempt * mb)


EXTRACTION_PARAMS = (
    "dtype",
    "compression",
    "batch_size",
    "chunk_sequences",
    "autocast",
)


def extraction_params(model, split, shard, n_shards, seq_len):
    e = plan.extraction(config)
    spec = plan.model_spec(config, model)
    return {
        "model": model,
        "split": split,
        "shard": shard,
        "n_shards": n_shards,
        "seq_len": seq_len,
        **{k: e[k] for k in EXTRACTION_PARAMS},
        "layers": spec.get("layers", "all"),
        "source": spec,
        "corpus": CORPUS,
        "seed": config["seed"],
    }


def extract_params(wildcards):
    return extraction_params(
        wildcards.model, wildcards.split, int(wildcards.shard), len(SHARDS), SEQ_LEN
    )


def gpus_for(key):
    """A `resources: gpu` function: 1 when the section's device is CUDA."""
    return lambda wildcards: int(config[key]["device"].startswith("cuda"))


def mem_mb(base):
    return lambda wildcards, attempt: base * attempt


def extract_outputs():
    return [p for m in MODELS for s in SPLITS for p in score_shards(m, s)]


# ------------------------------------------------------------------------------- eigen, overlap


# The Dask scheduler settings are read by the scripts from `config`, not passed as params:
# where a computation runs must not trigger a re-run.
def eigen_rows_params(wildcards):
    e = config["eigen"]
    return {
        "view": wildcards.view,
        "variants": e["variants"],
        "split_every": e["split_every"],
    }


def eigen_full_params(wildcards):
    e = config["eigen"]
    return {
        "view": wildcards.view,
        "variants": e["variants"],
        "rank": e["full_rank"],
        "seed": config["seed"],
    }


def eigen_spectrum_params(wildcards):
    return {"report_k": config["eigen"]["report_k"]}


def model_view_pairs():
    return [(m, v) for m in MODELS for v in plan.model_views(config, m)]


def eigen_outputs():
    return [
        expand(rules.eigen_spectrum.output[0], model=m, view=v)[0]
        for m, v in model_view_pairs()
    ]


def eigen_dirs():
    return [str(Path(p).parent) for p in eigen_outputs()]


def overlap_within_outputs():
    return [
        expand(rules.overlap_within.output[0], model=m, view=v, variant=variant)[0]
        for m, v in model_view_pairs()
        for variant in config["eigen"]["variants"]
    ]


def overlap_cross_outputs():
    return expand(
        rules.overlap_cross.output[0],
        zip,
        model_a=[
            a for a, b in plan.cross_pairs(config) for _ in config["eigen"]["variants"]
        ],
        model_b=[
            b for a, b in plan.cross_pairs(config) for _ in config["eigen"]["variants"]
        ],
        variant=[
            v for _ in plan.cross_pairs(config) for v in config["eigen"]["variants"]
        ],
    )


def cross_inputs(wildcards):
    rows, halves = rules.eigen_rows.output.rows, rules.eigen_rows.output.halves
    return {
        f"{side}{suffix}": expand(
            pattern, model=getattr(wildcards, f"model_{side}"), view="prefix"
        )[0]
        for side in ("a", "b")
        for suffix, pattern in (("", rows), ("_halves", halves))
    }


def overlap_params(wildcards):
    return {"k": config["overlap"]["k"], "variant": wildcards.variant}


def overlap_summary_inputs(wildcards):
    return {"within": overlap_within_outputs(), "cross": overlap_cross_outputs()}


# ---------------------------------------------------------------------- reconstruction, plug-in


def transfer_inputs(wildcards):
    others = plan.other_models(config, wildcards.model, wildcards.view)
    return expand(rules.eigen_rows.output.rows, model=others, view="prefix")


def reconstruct_params(wildcards):
    return {
        **plan.reconstruction(config),
        "seed": config["seed"],
        "other_models": plan.other_models(config, wildcards.model, wildcards.view),
    }


def reconstruct_outputs():
    return [
        expand(rules.reconstruct_view.output[0], model=m, view=v)[0]
        for m, v in model_view_pairs()
    ]


def plugin_rows(wildcards):
    view = plan.plugin_view(config, wildcards.model)
    return expand(rules.eigen_rows.output.rows, model=wildcards.model, view=view)[0]


def plugin_params(wildcards):
    r = config["reconstruction"]
    return {
        **{k: v for k, v in config["plugin"].items() if k != "device"},
        "ridge": r["ridge"],
        "eigenspace_rank": r["eigenspace_rank"],
        "seed": config["seed"],
    }


def plugin_outputs():
    return expand(rules.plugin_eval_model.output[0], model=MODELS)


# ------------------------------------------------------------------------------------ training

# The training keys a run's result depends on (its params); device and cadence-free keys aside.
RUN_KEYS = [
    "vocab",
    "vocab_size",
    "model",
    "steps",
    "finetune_steps",
    "batch_size",
    "lr",
    "finetune_lr",
    "weight_decay",
    "warmup",
    "log_every",
    "eval_every",
    "checkpoint_every",
]
MAP_KEYS = ["estimator", "strategy", "ridge", "eigenspace_rank"]
USES_MAPS = ["partial_fixed", "partial_learned", "subset_only"]


def run_outputs(name):
    return [
        expand(getattr(rules.train_run.output, name), **r)[0]
        for r in plan.training_runs(config)
    ]


def tokenizer_input(wildcards):
    if TRAIN["vocab"] == "minilm":
        return {"minilm": expand(rules.fetch_model.output[0], model="minilm")[0]}
    return {"documents": corpus_documents()}


def train_inputs(wildcards):
    ins = {
        "tokenizer": rules.train_tokenizer.output[0],
        "windows": rules.train_data.output[0],
    }
    if wildcards.tvariant in USES_MAPS:
        ins["stats"] = expand(rules.eigen_rows.output.rows, model=TRAINED, view="all")[
            0
        ]
    if wildcards.mode == "finetune":
        ins["init"] = trained_model_dir()
    return ins


def train_params(wildcards):
    keys = RUN_KEYS + (MAP_KEYS if wildcards.tvariant in USES_MAPS else [])
    return {
        "tcfg": {k: TRAIN[k] for k in keys},
        "seq_len": SEQ_LEN,
        "data_seed": config["seed"],
    }


# ------------------------------------------------------------------------- claims and notebooks


def claims_inputs(wildcards):
    return {
        "spectra": eigen_outputs(),
        "overlap_summary": rules.overlap_summary.output[0],
        "recon": reconstruct_outputs(),
        "plugin": plugin_outputs(),
        "training": rules.train_summary.output[0],
        "scaling_fits": scaling_files("fits"),
        "scaling_saturation": scaling_files("saturation"),
        "scaling_tables": scaling_files("table"),
    }


def notebook_data(name):
    """The pipeline outputs each notebook reads (its papermill parameters)."""
    if name == "spectrum":
        return {"eigen_dirs": eigen_dirs()}
    if name == "overlap":
        return {
            "within": overlap_within_outputs(),
            "cross": overlap_cross_outputs(),
            "summary": rules.overlap_summary.output[0],
            "k_heatmap": config["claims"]["k_report"],
        }
    if name == "reconstruction":
        return {
            "recon": reconstruct_outputs(),
            "plugin": plugin_outputs(),
            "s_report": config["claims"]["s_report"],
        }
    if name == "training":
        return {
            "summary": rules.train_summary.output[0],
            "metrics": run_outputs("metrics"),
        }
    if name == "scaling":
        return {
            "tables": scaling_files("table"),
            "fits": scaling_files("fits"),
            "saturation": scaling_files("saturation"),
        }
    return {"claims": rules.claims.output[0]}


def notebook_inputs(wildcards):
    files = []
    for k, v in notebook_data(wildcards.name).items():
        if k == "eigen_dirs":
            files += [
                f"{d}/{f}"
                for d in v
                for f in ("spectrum.csv", "rows.zarr", "full.zarr")
            ]
        elif isinstance(v, list):
            files += v
        elif isinstance(v, str):
            files.append(v)
    return {"nb": str(NOTEBOOK_DIR / f"{wildcards.name}.ipynb"), "data": files}


def notebook_params(wildcards):
    return json.dumps(
        {
            **notebook_data(wildcards.name),
            "fig_dir": f"results/figures/{wildcards.name}",
        }
    )


def notebook_outputs():
    return expand(rules.notebook.output.nb, name=NOTEBOOKS)


# `snakemake --report` builds the report from the DAG of the default target and fails on a
# marked output that does not exist, and Snakemake tells a workflow nothing else about report
# mode. In report mode the default target therefore asks only for outputs that exist, so a report
# after a partial run covers the stages that ran.
def report_mode():
    return any(a == "--report" or a.startswith("--report=") for a in sys.argv)


# ------------------------------------------------------------------------------------- scaling


def scaling_sampling_params(wildcards):
    return {
        "seed": config["seed"],
        "seq_len": int(wildcards.n),
        "n_sequences": {"fit": int(wildcards.N), "heldout": 1},
        "heldout_fraction": config["sampling"]["heldout_fraction"],
    }


def scaling_passages(wildcards):
    return expand(
        rules.scaling_sample_passages.output[0],
        corpus=CORPUS,
        n=wildcards.n,
        N=wildcards.N,
    )[0]


def scaling_extract_params(wildcards):
    """A grid point's extraction: at most scaling.max_layers layers, and chunks small enough that
    even a small N has two halves (a batch is whole chunks)."""
    p = extraction_params(wildcards.model, "fit", 0, 1, int(wildcards.n))
    chunk = min(p["chunk_sequences"], max(1, int(wildcards.N) // 2))
    batch = p["batch_size"] if chunk == p["chunk_sequences"] else chunk
    return {
        **p,
        "layers": plan.scaling_layers(config, wildcards.model),
        "chunk_sequences": chunk,
        "batch_size": batch,
    }


def scaling_spectrum_inputs(wildcards):
    point = (int(wildcards.n), int(wildcards.N))
    out = rules.scaling_eigen_rows.output
    ins = {
        k: expand(
            getattr(out, k),
            model=wildcards.model,
            view=wildcards.view,
            n=point[0],
            N=point[1],
        )[0]
        for k in ("rows", "halves")
    }
    if point in plan.scaling_points(config, wildcards.model)["full"]:
        ins["full"] = expand(
            rules.scaling_eigen_full.output[0],
            model=wildcards.model,
            view=wildcards.view,
            n=point[0],
            N=point[1],
        )[0]
    return ins


def scaling_spectrum(model, view, n, N):
    """A grid point's spectrum.csv: the main run's where the point coincides with it."""
    if plan.is_main_point(config, model, n, N):
        return expand(rules.eigen_spectrum.output[0], model=model, view=view)[0]
    return expand(
        rules.scaling_eigen_spectrum.output[0], model=model, view=view, n=n, N=N
    )[0]


def scaling_spectra(wildcards):
    return [
        scaling_spectrum(wildcards.model, wildcards.view, n, N)
        for n, N in plan.scaling_points(config, wildcards.model)["all"]
    ]


def scaling_table_params(wildcards):
    s = config["scaling"]
    points = plan.scaling_points(config, wildcards.model)["all"]
    return {
        "n": [n for n, _ in points],
        "N": [N for _, N in points],
        "length_N": plan.length_sequences(config),
        "sample_length": s["sample_length"],
        "bootstrap": s["bootstrap"],
        "seed": config["seed"],
    }


def scaling_files(name):
    """One output of the scaling table rule (`table`, `fits`, `saturation`) per model and view."""
    return [
        expand(getattr(rules.scaling_table.output, name), model=m, view=v)[0]
        for m in plan.scaling_models(config)
        for v in plan.model_views(config, m)
    ]


def scaling_outputs():
    return [p for name in ("table", "fits", "saturation") for p in scaling_files(name)]


def all_outputs(wildcards):
    outputs = (
        extract_outputs()
        + eigen_outputs()
        + [rules.overlap_summary.output[0]]
        + reconstruct_outputs()
        + plugin_outputs()
        + [rules.train_summary.output[0], rules.claims.output[0]]
        + scaling_outputs()
        + notebook_outputs()
    )
    if report_mode():
        outputs = [p for p in outputs if Path(p).exists()]
    return outputs
