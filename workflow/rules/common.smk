# Config validation and every input function. The other .smk files hold only rules.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from eigenattn.config import (
    check_config,
    cross_pairs,
    model_views,
    plugin_view,
    trained_model_spec,
    validate_schema,
)  # noqa: E402
from eigenattn.errors import ConfigError  # noqa: E402

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"

try:
    validate_schema(config, SCHEMA)
    check_config(config, workdir=".")
except ConfigError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None

# The trained exact encoder becomes a model source (`path:`) that the extraction and eigen rules
# analyse like any other model; the partial training variants read that analysis.
TRAIN = config["training"]
TRAINED = TRAIN["analysis_model"]
config["models"][TRAINED] = trained_model_spec(config)

MODELS = config["run_models"]
SPLITS = ["fit", "heldout"]
SHARDS = list(range(config["extraction"]["shards"]))
CORPUS = config["corpus"]


wildcard_constraints:
    model="|".join(sorted(config["models"])),
    model_a="|".join(sorted(config["models"])),
    model_b="|".join(sorted(config["models"])),
    corpus="|".join(sorted(config["corpora"])),
    split="fit|heldout",
    shard=r"\d+",
    view="all|prefix",
    variant="raw|row_centered",
    mode="scratch|finetune",
    tvariant="exact|partial_fixed|partial_learned|subset_only|linformer",
    name="spectrum|overlap|reconstruction|training|summary",
    s=r"\d+",
    seed=r"\d+",


def log_start():
    print(
        f"eigenattn: models {', '.join(MODELS)}; corpus {CORPUS}; "
        f"seq_len {config['sampling']['seq_len']}; "
        f"n_sequences {config['sampling']['n_sequences']}; seed {config['seed']}"
    )


def model_spec(wildcards):
    return config["models"][wildcards.model]


def corpus_spec(wildcards):
    return config["corpora"][wildcards.corpus]


def score_shards(model, split):
    return [f"results/scores/{model}/{split}/shard-{i}.zarr" for i in SHARDS]


def extract_params(wildcards):
    e = config["extraction"]
    return {
        "model": wildcards.model,
        "split": wildcards.split,
        "shard": int(wildcards.shard),
        "n_shards": len(SHARDS),
        "seq_len": config["sampling"]["seq_len"],
        "dtype": e["dtype"],
        "compression": e["compression"],
        "batch_size": e["batch_size"],
        "device": e["device"],
        "autocast": e["autocast"],
        "layers": config["models"][wildcards.model].get("layers", "all"),
        "source": config["models"][wildcards.model],
        "corpus": CORPUS,
        "seed": config["seed"],
    }


def extract_gpus(wildcards):
    return 1 if config["extraction"]["device"].startswith("cuda") else 0


def extract_mem_mb(wildcards, attempt):
    return 4000 * attempt


def sampling_params(wildcards):
    return {"seed": config["seed"], **config["sampling"]}


def extract_outputs():
    return [p for m in MODELS for s in SPLITS for p in score_shards(m, s)]


def fit_shards(wildcards):
    return score_shards(wildcards.model, "fit")


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
    return {"view": wildcards.view, "variants": config["eigen"]["variants"]}


def eigen_spectrum_params(wildcards):
    return {"report_k": config["eigen"]["report_k"]}


def eigen_mem_mb(wildcards, attempt):
    return 4000 * attempt


def eigen_outputs():
    return [
        f"results/eigen/{m}/{v}/spectrum.csv"
        for m in MODELS
        for v in model_views(config, m, ".")
    ]


def overlap_within_outputs():
    return [
        f"results/overlap/{m}/{v}/{variant}.zarr"
        for m in MODELS
        for v in model_views(config, m, ".")
        for variant in config["eigen"]["variants"]
    ]


def overlap_cross_outputs():
    return [
        f"results/overlap/cross/{a}__{b}/prefix/{variant}.zarr"
        for a, b in cross_pairs(config)
        for variant in config["eigen"]["variants"]
    ]


def overlap_params(wildcards):
    return {"k": config["overlap"]["k"], "variant": wildcards.variant}


def overlap_summary_inputs(wildcards):
    return {
        "within": overlap_within_outputs(),
        "cross": overlap_cross_outputs(),
    }


def heldout_shards(wildcards):
    return score_shards(wildcards.model, "heldout")


def transfer_models(wildcards):
    r = config["reconstruction"]
    if wildcards.view != "prefix" or "other_model" not in r["transfer"]:
        return []
    return [m for m in MODELS if m != wildcards.model]


def reconstruct_transfer_inputs(wildcards):
    return [f"results/eigen/{m}/prefix/rows.zarr" for m in transfer_models(wildcards)]


def reconstruct_params(wildcards):
    r = config["reconstruction"]
    others = transfer_models(wildcards)
    return {
        **r,
        "seed": config["seed"],
        "other_models": others,
    }


def reconstruct_outputs():
    return [
        f"results/reconstruction/{m}/{v}.csv"
        for m in MODELS
        for v in model_views(config, m, ".")
    ]


def plugin_rows(wildcards):
    return f"results/eigen/{wildcards.model}/{plugin_view(config, wildcards.model, '.')}/rows.zarr"


def plugin_params(wildcards):
    return {
        **{k: v for k, v in config["plugin"].items() if k != "device"},
        "device": config["plugin"]["device"],
        "ridge": config["reconstruction"]["ridge"],
        "eigenspace_rank": config["reconstruction"]["eigenspace_rank"],
        "seed": config["seed"],
    }


def plugin_gpus(wildcards):
    return 1 if config["plugin"]["device"].startswith("cuda") else 0


def plugin_outputs():
    return [f"results/plugin/{m}.csv" for m in MODELS]


def model_source_input(wildcards):
    """A `path` model produced by this workflow (the trained encoder) is an input of fetch_model."""
    spec = config["models"][wildcards.model]
    if spec.get("source") == "path" and str(spec.get("path", "")).startswith(
        "results/"
    ):
        return [spec["path"]]
    return []


SEQ_LEN = config["sampling"]["seq_len"]
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


def run_dir(mode, variant, s, seed):
    return f"results/training/{mode}/{variant}/s{s}/seed{seed}"


def training_runs():
    """(mode, variant, s, seed) of every run; exact's s is the sequence length (all keys)."""
    runs = []
    for mode in TRAIN["modes"]:
        runs += [(mode, "exact", SEQ_LEN, seed) for seed in TRAIN["exact_seeds"]]
        for v in TRAIN["variants"]:
            runs += [
                (mode, v, s, seed)
                for s in TRAIN["subset_sizes"]
                for seed in TRAIN["seeds"]
            ]
    return runs


def training_finals():
    return [f"{run_dir(*r)}/final.json" for r in training_runs()]


def tokenizer_input(wildcards):
    if TRAIN["vocab"] == "minilm":
        return {"minilm": "resources/models/minilm"}
    return {"documents": f"resources/corpora/{CORPUS}/documents.parquet"}


def train_inputs(wildcards):
    ins = {
        "tokenizer": "results/training/tokenizer",
        "windows": "results/training/data/windows.npz",
    }
    if wildcards.tvariant in USES_MAPS:
        ins["stats"] = f"results/eigen/{TRAINED}/all/rows.zarr"
    if wildcards.mode == "finetune":
        ins["init"] = trained_model_spec(config)["path"]
    return ins


def train_params(wildcards):
    keys = RUN_KEYS + (MAP_KEYS if wildcards.tvariant in USES_MAPS else [])
    return {
        "tcfg": {k: TRAIN[k] for k in keys},
        "seq_len": SEQ_LEN,
        "data_seed": config["seed"],
    }


def train_gpus(wildcards):
    return 1 if TRAIN["device"].startswith("cuda") else 0


NOTEBOOKS = ["spectrum", "overlap", "reconstruction", "training", "summary"]
NOTEBOOK_DIR = Path(workflow.basedir) / "notebooks"


def notebook_data(name):
    """The pipeline outputs each notebook reads (its papermill parameters)."""
    eigen_dirs = [str(Path(p).parent) for p in eigen_outputs()]
    if name == "spectrum":
        return {"eigen_dirs": eigen_dirs}
    if name == "overlap":
        within = overlap_within_outputs()
        cross = overlap_cross_outputs()
        return {
            "within": within,
            "cross": cross,
            "summary": "results/overlap/summary.csv",
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
            "summary": "results/training/summary.csv",
            "metrics": [f"{run_dir(*r)}/metrics.csv" for r in training_runs()],
        }
    return {"claims": "results/claims.csv"}


def claims_inputs(wildcards):
    return {
        "spectra": eigen_outputs(),
        "overlap_summary": "results/overlap/summary.csv",
        "recon": reconstruct_outputs(),
        "plugin": plugin_outputs(),
        "training": "results/training/summary.csv",
    }


def notebook_inputs(wildcards):
    name = wildcards.name
    d = notebook_data(name)
    files = []
    for k, v in d.items():
        if k == "eigen_dirs":
            files += [
                f"{x}/{f}"
                for x in v
                for f in ("spectrum.csv", "rows.zarr", "full.zarr")
            ]
        elif isinstance(v, list):
            files += v
        elif isinstance(v, str):
            files.append(v)
    return {"nb": str(NOTEBOOK_DIR / f"{name}.ipynb"), "data": files}


def notebook_params(wildcards):
    import json

    name = wildcards.name
    p = {**notebook_data(name), "fig_dir": f"results/figures/{name}"}
    return json.dumps(p)


def notebook_outputs():
    return [f"results/notebooks/{n}.ipynb" for n in NOTEBOOKS]


# `snakemake --report` builds the report from the DAG of the default target and fails on a
# marked output that does not exist. In report mode the default target therefore asks only for
# outputs that exist, so a report after a partial run covers the stages that ran.
REPORT_MODE = any(a == "--report" or a.startswith("--report=") for a in sys.argv)


def all_outputs(wildcards):
    outputs = (
        extract_outputs()
        + eigen_outputs()
        + ["results/overlap/summary.csv"]
        + reconstruct_outputs()
        + plugin_outputs()
        + ["results/training/summary.csv", "results/claims.csv"]
        + notebook_outputs()
    )
    if REPORT_MODE:
        outputs = [p for p in outputs if Path(p).exists()]
    return outputs
