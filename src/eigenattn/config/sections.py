"""The typed settings of the config sections that planning reads (``eigen``, ``overlap``,
``scaling``), and the base of every settings class.

Their ``from_config`` constructors are the only code that names the keys of these sections. They sit
below :mod:`eigenattn.config.plan`, which builds the workflow's targets from them, and
:mod:`eigenattn.config.settings`, whose per-rule classes build on plan, re-exports them. Lists stay
lists, as in the config: the rules pass them as params, whose recorded values must not change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class _Settings:
    def params(self) -> dict:
        """The fields as a plain dict: the rule's params (a rerun trigger)."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(params).items() if k in names})


def _list(value):
    """A list of the config as a new list; a keyword in its place (auto, first) as it is."""
    return list(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Eigen(_Settings):
    """The eigen analysis (docs/method.md §2-4): the views and variants analysed, and how the row,
    full-matrix and per-input spectra are computed. Where it runs (scheduler, memory, route) is
    :class:`eigenattn.config.settings.Runtime`."""

    views: str | list  # auto, or the views
    variants: list
    report_k: list
    split_every: int
    full_rank: int | None
    per_input_split: str
    vector_dtype: str = "auto"

    @classmethod
    def from_config(cls, config: dict) -> Eigen:
        e = config["eigen"]
        return cls(
            _list(e["views"]),
            _list(e["variants"]),
            _list(e["report_k"]),
            e["split_every"],
            e["full_rank"],
            e["per_input_split"],
            e["vector_dtype"],
        )


@dataclass(frozen=True)
class Overlap(_Settings):
    """The subspace overlap (docs/method.md §5): its sizes k and the model pairs compared."""

    k: list
    cross_pairs: str | list  # auto, or [model_a, model_b] pairs

    @classmethod
    def from_config(cls, config: dict) -> Overlap:
        o = config["overlap"]
        return cls(_list(o["k"]), _list(o["cross_pairs"]))


@dataclass(frozen=True)
class Scaling(_Settings):
    """The scaling study (docs/method.md §10): the models and the (n, N) grid of its two sweeps."""

    models: str | list  # auto, first, or the models
    sample_models: str | list  # auto, or the models
    max_layers: int | None
    lengths: list
    length_sequences: str | int  # auto, or N
    samples: list
    sample_length: int
    bootstrap: int

    @classmethod
    def from_config(cls, config: dict) -> Scaling:
        s = config["scaling"]
        return cls(
            _list(s["models"]),
            _list(s["sample_models"]),
            s["max_layers"],
            _list(s["lengths"]),
            s["length_sequences"],
            _list(s["samples"]),
            s["sample_length"],
            s["bootstrap"],
        )
