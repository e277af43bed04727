"""Typed, frozen settings: what each stage's library functions take instead of the config dict.

Each dataclass is built from the config in one place, its ``from_config`` constructor, which is the
only code outside this package that names config keys. The settings of the sections that planning
reads (:class:`Eigen`, :class:`Overlap`, :class:`Scaling`) live in :mod:`eigenattn.config.sections`,
below :mod:`eigenattn.config.plan`, and are re-exported here. A rule passes ``settings.params()`` (a plain
dict of the fields) as its params, so Snakemake's params rerun trigger sees every science value
exactly as before; the script rebuilds the dataclass with ``from_params`` and calls the library.

Where a job runs (:class:`Runtime`: the torch device, the Dask scheduler) is passed as the object
itself. Snakemake records only builtin values as params, so changing where a job runs re-runs
nothing (tests/test_rerun.py checks it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from eigenattn.config import plan
from eigenattn.config.sections import Eigen, Overlap, Scaling, _Settings
from eigenattn.errors import ConfigError

__all__ = ["Eigen", "Overlap", "Scaling"]  # re-exported: every settings class is importable from here


@dataclass(frozen=True)
class Runtime(_Settings):
    """Where a job runs: not science, never a rerun trigger. ``key`` names the device's config key;
    ``memory_mb`` and ``route``: how the full-matrix analysis may use the machine (``eigen.gram_memory_mb``,
    ``eigen.full_route``: both change where it runs, not what it computes)."""

    device: str = "cpu"
    key: str = ""
    scheduler: str = "threads"
    slurm: dict | None = None
    memory_mb: float | None = None
    route: str = "auto"
    cores: int | None = None  # the local run's --cores (None under a cluster executor)

    @classmethod
    def from_config(cls, config: dict, section: str, cores: int | None = None) -> Runtime:
        s = config[section]
        return cls(
            device=s.get("device", "cpu"),
            key=f"{section}.device",
            scheduler=s.get("scheduler", "threads"),
            slurm=s.get("slurm"),
            memory_mb=s.get("gram_memory_mb"),
            route=s.get("full_route", "auto"),
            cores=cores,
        )

    def threads_now(self, own: int) -> int:
        """A job's threads now: its own, or more where the local run's cores are free
        (:func:`eigenattn.storage.running.free_threads`; the Dask scheduler on SLURM: its own)."""
        from eigenattn.storage.running import free_threads

        return free_threads(own, self.cores if self.scheduler == "threads" else None)

    def torch_device(self):
        """The torch device (auto: CUDA when present, else the CPU); CUDA asked for but absent fails."""
        import torch  # not at module level: the Snakefile imports this module at parse time

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                self.key, f"'{self.device}' requested but CUDA is not available", "use device: auto or cpu"
            )
        return torch.device(self.device)


@dataclass(frozen=True)
class Sampling(_Settings):
    """One passage sample (the main run's, or a grid point of the scaling study)."""

    corpus: str
    seed: int
    seq_len: int
    n_sequences: dict
    heldout_fraction: float
    key: str  # the config section the sizes come from, for errors: sampling or scaling

    @classmethod
    def from_config(cls, config: dict) -> Sampling:
        s = config["sampling"]
        return cls(
            config["corpus"], config["seed"], s["seq_len"], dict(s["n_sequences"]), s["heldout_fraction"], "sampling"
        )

    @classmethod
    def scaling_point(cls, config: dict, n: int, N: int) -> Sampling:
        return cls(
            config["corpus"],
            config["seed"],
            int(n),
            {"fit": int(N), "heldout": 1},
            config["sampling"]["heldout_fraction"],
            "scaling",
        )

    def size_key(self, split: str) -> str:
        return f"sampling.n_sequences.{split}" if self.key == "sampling" else "scaling.samples"


@dataclass(frozen=True)
class ModelFacts(_Settings):
    """What the config says of a model, checked against the model itself after the probe. The
    extraction rule passes it as the object, like :class:`Runtime`: ``layers`` and ``causal`` are
    recorded through :class:`Extraction`'s ``source``, and ``n_layers`` and ``heads`` describe the
    model without changing a score, so declaring them re-runs nothing."""

    model: str
    layers: Any  # "all", a list of indices, or {"of": [...], "at_most": k}
    causal: bool | None
    n_layers: int | None = None
    heads: int | None = None

    @classmethod
    def from_config(cls, config: dict, model: str) -> ModelFacts:
        spec = plan.model_spec(config, model)
        n_layers, heads = plan.model_shape(config, model)
        return cls(model, spec.get("layers", "all"), spec.get("causal"), n_layers, heads)


@dataclass(frozen=True)
class Extraction(_Settings):
    """One score shard: which passages, how they are stored, and what the store is stamped with."""

    model: str
    split: str
    shard: int
    n_shards: int
    seq_len: int
    dtype: str
    compression: Any
    batch_size: int
    chunk_sequences: int
    autocast: Any
    layers: Any
    source: dict
    corpus: str
    seed: int

    @classmethod
    def from_config(
        cls,
        config: dict,
        model: str,
        split: str,
        shard: int,
        n_shards: int,
        seq_len: int,
        *,
        layers=None,
        chunk: int | None = None,
        batch: int | None = None,
    ) -> Extraction:
        """``layers``, ``chunk`` and ``batch`` override the config's (the scaling study's grid points)."""
        e = plan.extraction(config)
        spec = plan.recorded_spec(config, model)
        chunk = e["chunk_sequences"] if chunk is None else chunk
        return cls(
            model,
            split,
            int(shard),
            int(n_shards),
            int(seq_len),
            e["dtype"],
            e["compression"],
            e["batch_size"] if batch is None else batch,
            chunk,
            e["autocast"],
            spec.get("layers", "all") if layers is None else layers,
            spec,
            config["corpus"],
            config["seed"],
        )

    def attrs(self) -> dict:
        """The store attrs that say where its scores come from."""
        return {
            "model": self.model,
            "source": self.source,
            "corpus": self.corpus,
            "split": self.split,
            "seed": self.seed,
            "shard": self.shard,
            "n_shards": self.n_shards,
        }


def expected_scores(config: dict, model: str, split: str, n: int | None = None) -> dict:
    """What a score store read by a rule must have been written with (its attrs); a store left over
    from another configuration is refused rather than analysed. ``dtype: auto`` is resolved per
    model at extraction, so it is checked against the dtype the store was asked for
    (``dtype_requested``), an explicit dtype against the dtype stored."""
    dtype = config["extraction"]["dtype"]
    return {
        "model": model,
        "split": split,
        "seq_len": int(n or config["sampling"]["seq_len"]),
        **({"dtype_requested": dtype} if dtype == "auto" else {"dtype": dtype}),
        "seed": config["seed"],
    }


@dataclass(frozen=True)
class PerInput(_Settings):
    """The per-input spectrum of attention probabilities (docs/method.md §12): the split it reads."""

    split: str

    @classmethod
    def from_config(cls, config: dict) -> PerInput:
        return cls(Eigen.from_config(config).per_input_split)


@dataclass(frozen=True)
class Spectrum(_Settings):
    """The spectrum table of one model and view: the k whose explained variance EV(k) it reports."""

    report_k: list

    @classmethod
    def from_config(cls, config: dict) -> Spectrum:
        return cls(Eigen.from_config(config).report_k)


@dataclass(frozen=True)
class SubspaceOverlap(_Settings):
    """One overlap computation (docs/method.md §5), within a model or across a pair: the subspace
    sizes k, and the score variant whose row spectra it compares."""

    k: list
    variant: str

    @classmethod
    def from_config(cls, config: dict, variant: str) -> SubspaceOverlap:
        return cls(Overlap.from_config(config).k, variant)


@dataclass(frozen=True)
class ScalingTable(_Settings):
    """The scaling table of one model (docs/method.md §10): its grid points (n, N) in the order of
    its spectra, N of the length sweep, n of the sample sweep, and the bootstrap of the fits."""

    n: list
    N: list
    length_N: int
    sample_length: int
    bootstrap: int
    seed: int

    @classmethod
    def from_config(cls, config: dict, model: str) -> ScalingTable:
        s, points = Scaling.from_config(config), plan.scaling_points(config, model)["all"]
        return cls(
            [n for n, _ in points],
            [N for _, N in points],
            plan.length_sequences(config),
            s.sample_length,
            s.bootstrap,
            config["seed"],
        )


@dataclass(frozen=True)
class Reconstruction(_Settings):
    """The held-out reconstruction of one model and view (docs/method.md §6)."""

    estimators: tuple
    strategies: tuple
    subset_sizes: tuple
    ridge: float
    rank: float
    seed: int
    eval_rows: int | None
    transfer: tuple = ()
    transfer_estimators: tuple = ()
    other_models: tuple = ()
    peers: tuple = ()  # none unless asked: the config's values come from the schema
    peers_explicit: bool = False
    q_last: int = 0
    sinks: int = 0
    pinv: tuple = ()

    @classmethod
    def from_config(cls, config: dict, model: str, view: str) -> Reconstruction:
        r = config["reconstruction"]
        return cls(
            tuple(r["estimators"]),
            tuple(r["strategies"]),
            tuple(r["subset_sizes"]),
            r["ridge"],
            r["eigenspace_rank"],
            config["seed"],
            r["eval_rows"],
            tuple(plan.transfers(config)),
            tuple(r["transfer_estimators"]),
            tuple(plan.other_models(config, model, view)),
            *_peer_fields(config, "reconstruction"),
        )

    @property
    def peer_settings(self) -> PeerSettings:
        return _peer_settings(self, "reconstruction.peers")


def _peer_fields(config: dict, section: str) -> tuple:
    """The peer fields shared by :class:`Reconstruction` and :class:`Plugin`, in their order:
    peers, peers_explicit, q_last, sinks, pinv (``section``: whose ``peers`` list)."""
    r = config["reconstruction"]
    peers, explicit = plan.peers(config, section)
    return tuple(peers), explicit, r["peer_q_last"], r["peer_sinks"], tuple(r["nystrom_pinv"])


def _peer_settings(s, key: str) -> PeerSettings:
    return PeerSettings(s.peers, s.peers_explicit, s.q_last, s.sinks, s.pinv, key)


@dataclass(frozen=True)
class PeerSettings(_Settings):
    """The peers of one evaluation (``key``: the config key that lists them)."""

    methods: tuple
    explicit: bool
    q_last: int
    sinks: int
    pinv: tuple
    key: str

    def variants(self, method: str) -> tuple:
        """The strategy column of a peer's rows: nystrom's pseudo-inverses, "-" for the others."""
        return self.pinv if method == "nystrom" else ("-",)


@dataclass(frozen=True)
class Plugin(_Settings):
    """The plug-in evaluation of one model (docs/method.md §7)."""

    estimators: tuple
    strategies: tuple
    subset_sizes: tuple
    n_sequences: int
    batch_size: int
    ridge: float
    rank: float
    seed: int
    peers: tuple = ()  # none unless asked: the config's values come from the schema
    peers_explicit: bool = False
    q_last: int = 0
    sinks: int = 0
    pinv: tuple = ()

    @classmethod
    def from_config(cls, config: dict) -> Plugin:
        p, r = config["plugin"], config["reconstruction"]
        return cls(
            tuple(p["estimators"]),
            tuple(p["strategies"]),
            tuple(p["subset_sizes"]),
            p["n_sequences"],
            p["batch_size"],
            r["ridge"],
            r["eigenspace_rank"],
            config["seed"],
            *_peer_fields(config, "plugin"),
        )

    @property
    def peer_settings(self) -> PeerSettings:
        return _peer_settings(self, "plugin.peers")


@dataclass(frozen=True)
class EncoderModel(_Settings):
    """The MLM encoder's shape (training.model)."""

    layers: int
    heads: int
    d_model: int
    d_ff: int
    dropout: float
    positions: str
    init_range: float


# The training keys a run's result depends on; the maps' keys only for the variants that use them.
RUN_KEYS = (
    "vocab",
    "vocab_size",
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
)
MAP_KEYS = ("estimator", "strategy", "ridge", "eigenspace_rank")
USES_MAPS = ("partial_fixed", "partial_learned", "subset_only")


@dataclass(frozen=True)
class Training(_Settings):
    """One training run's hyper-parameters (docs/method.md §8). The map keys are None for variants
    that use no fitted maps, so changing them does not re-run those."""

    vocab: str
    vocab_size: int
    model: EncoderModel
    steps: int
    finetune_steps: int
    batch_size: int
    lr: float
    finetune_lr: float
    weight_decay: float
    warmup: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    seq_len: int
    data_seed: int
    estimator: str | None = None
    strategy: str | None = None
    ridge: float | None = None
    eigenspace_rank: float | None = None
    pinv: str | None = None

    @classmethod
    def from_config(cls, config: dict, variant: str = "exact") -> Training:
        t = config["training"]
        maps = {k: t[k] for k in MAP_KEYS} if variant in USES_MAPS else {}
        if variant == "nystrom":  # the only variant that reads it, so the others do not re-run
            maps["pinv"] = t["nystrom_pinv"]
        return cls(
            **{k: t[k] for k in RUN_KEYS},
            model=EncoderModel(**t["model"]),
            seq_len=config["sampling"]["seq_len"],
            data_seed=config["seed"],
            **maps,
        )

    def params(self) -> dict:
        """As for every settings class, except that ``pinv`` (read by nystrom only) is left out
        where it is None, so the runs of every other variant keep their recorded params."""
        p = asdict(self)
        if p["pinv"] is None:
            del p["pinv"]
        return p

    @classmethod
    def from_params(cls, params: dict) -> Training:
        p = dict(params)
        return cls(**{**p, "model": EncoderModel(**p["model"])})


@dataclass(frozen=True)
class Plans(_Settings):
    """Per-head plans (docs/method.md §13): budgets, damages and the head probe."""

    budgets: tuple
    damages: tuple
    sensitivity_sequences: int
    probe_vectors: int
    seed: int
    kernels: str  # auto, compiled, eager or dense (plan_attention.apply_plan)
    cost: str = "macs"  # macs or time: the axis of the budgets
    scope: str = "view"  # view or whole (causal models; encoders keep view)
    subset_sizes: tuple = ()  # the s grid of whole-scope candidates (reconstruction.subset_sizes)

    @classmethod
    def from_config(cls, config: dict) -> Plans:
        p = config["plans"]
        return cls(
            tuple(float(b) for b in p["budgets"]),
            tuple(p["damages"]),
            p["sensitivity_sequences"],
            p["probe_vectors"],
            config["seed"],
            p["kernels"],
            p["cost"],
            p["scope"],
            tuple(int(x) for x in config["reconstruction"]["subset_sizes"]),
        )

    def kernel_mode(self, device) -> str:
        """``kernels`` with auto resolved: compiled FlexAttention on CUDA; on a CPU its eager form
        (the other real kernels are the same in both), as torch.compile's C++ build of every new
        shape costs more than it saves at the pipeline's lengths."""
        if self.kernels != "auto":
            return self.kernels
        return "compiled" if str(device).startswith("cuda") else "eager"


@dataclass(frozen=True)
class ClaimThresholds(_Settings):
    """The claims table's thresholds (the ``claims:`` section; docs/method.md §9)."""

    k_report: int
    s_report: int
    c1_max_k90_share: float
    c2_min_ratio_random: float
    c3_min_gain: float
    c3_alpha: float
    c4_min_kept_gain: float

    @classmethod
    def from_config(cls, config: dict) -> ClaimThresholds:
        return cls.from_params(config["claims"])
