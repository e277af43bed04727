# Validation, shared constants, wildcard constraints and the final targets. Each stage's input,
# param and target functions sit in inputs/<stage>.smk, which the stage's rule file includes above
# its rules (Snakemake's linter wants functions and rules in separate files). The include order in
# the Snakefile follows the stages, and a function may use an earlier stage's.
#
# Paths: each output pattern is written once, in its rule; everything else refers to it as
# rules.<rule>.output and fills it with `path(...)`. Planning comes from eigenattn.config.plan and
# the typed settings from eigenattn.config.settings: both are functions of the config dict, so
# parsing the Snakefile reads no file but the config and the schema, and opens no socket.
import json
import sys
from pathlib import Path

from snakemake.utils import validate

from eigenattn.config import disk
from eigenattn.config import needs
from eigenattn.config import plan
from eigenattn.config import settings
from eigenattn.config import sources
from eigenattn.config import validation
from eigenattn.config.schema import SCHEMA_FILE, enum
from eigenattn.errors import ConfigError

# nested --config values arrive as strings: typed by the schema before it checks them
validation.coerce_overrides(config, workflow.config_settings.config)
try:
    validate(config, str(SCHEMA_FILE))
except WorkflowError as e:
    error = validation.validation_error(e)
    if error is None:
        raise
    raise WorkflowError(f"invalid configuration: {validation.explain(error)}") from None
# the grids left at their defaults fit the run (sampling.seq_len); what the user wrote is checked
ADAPTED = validation.adapt(config)
try:
    validation.check(config)
    sources.check(config)
except ConfigError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None
# Before any job (a dry run too), in the main process only (each job parses this file again): the
# defaults that adapted to the run, and what it needs of the machine and the network, as warnings.
if workflow.is_main_process:
    for line in ADAPTED + plan.notes(config):
        print(f"eigenattn: {line}", file=sys.stderr)
    for line in needs.needs(config):
        print(f"eigenattn: warning: {line}", file=sys.stderr)

MODELS = config["run_models"]
TRAINED = config["training"]["analysis_model"]
CORPUS = config["corpus"]
SPLITS = ["fit", "heldout"]
SHARDS = list(range(config["extraction"]["shards"]))
SEQ_LEN = config["sampling"]["seq_len"]
TRAIN = config["training"]
EIGEN = settings.Eigen.from_config(config)
TRAINING = bool(plan.training_runs(config))  # training.modes: [] trains nothing
NOTEBOOKS = [
    "spectrum",
    "overlap",
    "reconstruction",
    *(["training"] if TRAINING else []),
    "summary",
]
NOTEBOOKS += ["scaling"] if plan.scaling_models(config) else []
NOTEBOOKS += ["plans"] if config["plans"]["budgets"] else []
WHEEL_CACHE = "resources/wheels"
# The checkout this file belongs to (also when the workflow is used as a module).
CHECKOUT = (Path(workflow.current_basedir) / ".." / "..").resolve()


wildcard_constraints:
    model="|".join(sorted([*config["models"], TRAINED])),
    model_a="|".join(sorted(config["models"])),
    model_b="|".join(sorted(config["models"])),
    corpus="|".join(sorted(config["corpora"])),
    split="|".join(SPLITS),
    shard=r"\d+",
    group=r"\d+",
    view="|".join(enum("eigen.views")),
    variant="|".join(enum("eigen.variants")),
    mode="|".join(enum("training.modes")),
    tvariant="|".join(["exact", "uniform", *enum("training.variants")]),
    name="|".join(sorted({*NOTEBOOKS, "scaling", "plans"})),
    s=r"\d+",
    seed=r"\d+",
    n=r"\d+",
    N=r"\d+",


def log_start():
    print(
        f"eigenattn: models {', '.join(MODELS)}; corpus {CORPUS}; seq_len {SEQ_LEN}; "
        f"n_sequences {config['sampling']['n_sequences']}; seed {config['seed']}"
    )
    for note in ADAPTED + plan.notes(config):
        print(f"eigenattn: {note}")
    for line in STORE_SIZES:
        print(f"eigenattn: {line}")


def score_store_path(store):
    if store.part == "scaling":
        pattern = rules.scaling_extract_scores.output[0]
        return path(pattern, model=store.model, n=store.n, N=store.N)
    pattern = rules.extract_scores.output[0]
    return path(pattern, model=store.model, split=store.part, shard=store.shard)


def score_store_exists(store):
    return Path(score_store_path(store)).exists()


def score_store_sizes():
    """The score stores' sizes, one line per model and split and the total, printed (to stderr,
    so that --dag output stays a graph) and returned; a run whose stores still to write cannot fit
    the free disk of results/ is refused before any job. Only in the main process: each job parses
    the Snakefile again, while the stores are being written."""
    if not workflow.is_main_process:
        return []
    stores = disk.score_stores(config)
    lines = disk.size_lines(config, stores) + disk.stream_lines(config)
    for line in lines:
        print(f"eigenattn: {line}", file=sys.stderr)
    try:
        room = disk.check_room(config, stores, score_store_exists, "results/")
    except ConfigError as e:
        raise WorkflowError(f"invalid configuration: {e}") from None
    print(f"eigenattn: {room}", file=sys.stderr)
    return [*lines, room]


def path(pattern, **wildcards):
    """The one path of an output pattern for these wildcard values."""
    (one,) = expand(pattern, **wildcards)
    return one


def checkout_file(*parts):
    """A file of this workflow's checkout: relative to the working directory when it lies inside
    it, so a finished project moved or copied with its checkout re-runs nothing."""
    p = CHECKOUT.joinpath(*parts)
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def runtime(section):
    """Where a section's jobs run (device, Dask scheduler, the local run's cores): a params object
    that Snakemake does not record, so changing it re-runs nothing."""
    return settings.Runtime.from_config(config, section, local_cores())


def local_cores():
    """--cores of a local run (None under a cluster executor, or where it is not known)."""
    try:
        return int(workflow.cores) if workflow.local_exec else None
    except (WorkflowError, TypeError, ValueError, OverflowError):
        return None


def job_threads(wildcards):
    """Threads of a job that can split its own work (extraction, spectra, overlap, reconstruction,
    plug-in): a quarter of --cores, from 1 to 8. The DAG is wide (every model, view, length and
    training run is its own job), so on a small machine whole jobs side by side use the cores
    better than threads inside one: on 2 cores these jobs used 1.0-1.3 cores when given both, and
    a two-thread job waits for both cores while one-thread training runs take each core as it
    frees. Where --cores is not known (a cluster executor), 4; `set-threads` in a profile, or
    `--set-threads rule=N`, overrides this for any rule."""
    try:
        cores = int(workflow.cores)
    except (WorkflowError, TypeError, ValueError, OverflowError):
        return 4
    return max(1, min(8, cores // 4))


def gpus_for(key):
    """A `resources: gpu` function: 1 when the section's device is CUDA."""
    return lambda wildcards: int(config[key]["device"].startswith("cuda"))


def mem_mb(base):
    return lambda wildcards, attempt: base * attempt


# `snakemake --report` builds the report from the DAG of the default target and fails on a
# marked output that does not exist, and Snakemake tells a workflow nothing else about report
# mode. In report mode the default target therefore asks only for outputs that exist, so a report
# after a partial run covers the stages that ran.
def report_mode():
    return any(a == "--report" or a.startswith("--report=") for a in sys.argv)


def all_outputs(wildcards):
    outputs = (
        extract_outputs()
        + eigen_outputs()
        + per_input_outputs()
        + [rules.overlap_summary.output[0]]
        + reconstruct_outputs()
        + plugin_outputs()
        + plan_outputs()
        + (list(rules.train_summary.output) if TRAINING else [])
        + [rules.claims.output[0]]
        + scaling_outputs()
        + notebook_outputs()
    )
    if report_mode():
        outputs = [p for p in outputs if Path(p).exists()]
    return outputs
