"""Per-head plans (docs/method.md §13): the cheapest mix of methods that keeps a model's quality.

A plan gives every analysed head of a view one candidate: ``exact``, a paper estimator or baseline
(with its strategy and s) or a peer (with its s). Each candidate has

- a **cost**: its view MACs as a share of exact attention on the view (the one cost model,
  :mod:`eigenattn.reconstruction.cost`); every head of a view has the same exact cost, so a plan's
  cost share is the mean of its heads' shares over **every** head of the analysed layers (a head
  with no finite candidate, or one a hand-made plan does not name, runs exact at cost 1);
- a **damage** measured on the **fit** split: the head's mean TV on fit rows (the reconstruction
  table's ``split == "fit"`` rows), optionally weighted by the head's sensitivity.

For a budget B the plan minimises the summed damage subject to mean cost share ≤ B: a
multiple-choice knapsack, solved exactly by :func:`solve` (``scipy.optimize.milp``, HiGHS; what
the solver prints on the C-level stdout goes to this module's debug log, not the console).

A plan file is JSON (docs/data-contract.md, "Plans"): the model, the view and its geometry, the
settings the methods need (ridge, rank, seed, the peers' q_last and sinks), the budget and the
damage, and one entry per head with its method, strategy, s, cost share, damage and fit TV.
:func:`eigenattn.reconstruction.plan_attention.apply_plan` runs a plan inside a model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import Bounds, LinearConstraint, milp

from eigenattn.config.schema import enum
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.cost import ORACLES, PEERS, family

log = logging.getLogger(__name__)

EXACT = "exact"
PLAN_FORMAT = 1
DAMAGES = enum("plans.damages")
CANDIDATE_KEYS = ["layer", "head", "estimator", "strategy", "subset_size"]
SCOPES = enum("plans.scope")
COST_AXES = enum("plans.cost")
# the methods defined for causal whole attention (docs/method.md §15): the sparse patterns that
# need no statistics of a view; Nyström mixes rows across the causal boundary, the paper's maps
# are fitted for a view block
WHOLE_METHODS = {EXACT, "sink_window", "vertical_slash"}


@dataclass(frozen=True)
class HeadChoice:
    """One head's entry in a plan."""

    layer: int
    head: int
    method: str  # exact, a paper estimator or baseline, or a peer
    strategy: str  # the subset strategy, nystrom's pseudo-inverse, or "-"
    s: int  # subset size (landmarks for nystrom); 0 for exact
    cost_share: float
    damage: float
    tv_fit: float

    @property
    def family(self) -> str:
        return "exact" if self.method == EXACT else family(self.method)


@dataclass
class Plan:
    """A per-head plan of one model and view (see the module docstring)."""

    model: str
    view: str
    budget: float
    damage: str
    seq_len: int
    query_range: tuple
    key_range: tuple
    causal: bool
    settings: dict  # ridge, rank, seed (paper estimators), q_last, sinks (peers)
    heads: list = field(default_factory=list)  # HeadChoice, in (layer, head) order
    solver: dict = field(default_factory=dict)
    n_heads: int | None = None  # heads of the analysed layers (None: the heads listed)
    # view: methods on the view block only, the rest exact (§13); whole: on every query of a
    # causal head, as a deployed decoder runs them (§15; sink_window, vertical_slash and exact)
    scope: str = "view"
    cost: str = "macs"  # the axis the budget is on: macs (multiply-add share) or time (measured share)
    device: str | None = None  # the device whose latency table priced a time plan

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise InputError("plan scope", f"is {self.scope!r}", f"use one of {', '.join(SCOPES)}")
        if self.cost not in COST_AXES:
            raise InputError("plan cost", f"is {self.cost!r}", f"use one of {', '.join(COST_AXES)}")
        if self.scope == "whole":
            if not self.causal:
                raise InputError("plan scope", "whole scope is for causal models", "use scope view")
            whole = (0, int(self.seq_len))
            if tuple(self.query_range) != whole or tuple(self.key_range) != whole:
                raise InputError(
                    "plan scope",
                    f"a whole-scope plan covers queries and keys 0..{self.seq_len - 1}, "
                    f"not {tuple(self.query_range)} × {tuple(self.key_range)}",
                    "give it query_range and key_range (0, seq_len)",
                )
            bad = sorted({h.method for h in self.heads} - WHOLE_METHODS)
            if bad:
                raise InputError(
                    "plan scope",
                    f"methods {bad} are not defined for causal whole attention (§15)",
                    f"use {', '.join(sorted(WHOLE_METHODS))}",
                )

    @property
    def cost_share(self) -> float:
        """Mean cost share over every head of the analysed layers: heads the plan does not name run
        exact (cost 1), as :func:`eigenattn.reconstruction.plan_attention.apply_plan` runs them."""
        n = max(int(self.n_heads or 0), len(self.heads))
        if n == 0:
            return 1.0
        return float((sum(h.cost_share for h in self.heads) + (n - len(self.heads))) / n)

    @property
    def predicted_damage(self) -> float:
        return float(sum(h.damage for h in self.heads))

    def by_layer(self) -> dict[int, list[HeadChoice]]:
        out: dict[int, list[HeadChoice]] = {}
        for h in self.heads:
            out.setdefault(h.layer, []).append(h)
        return out

    def label(self) -> str:
        return f"plan:{self.damage}@{self.budget:g}"

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "view": self.view,
            "budget": self.budget,
            "damage": self.damage,
            "seq_len": self.seq_len,
            "query_range": list(self.query_range),
            "key_range": list(self.key_range),
            "causal": self.causal,
            "settings": self.settings,
            "cost_share": self.cost_share,
            "predicted_damage": self.predicted_damage,
            "solver": self.solver,
            "n_heads": max(int(self.n_heads or 0), len(self.heads)),
            "scope": self.scope,
            "cost": self.cost,
            "device": self.device,
            "heads": [asdict(h) for h in self.heads],
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise InputError(source, f"plan format {d.get('format')!r}, this version reads {PLAN_FORMAT}", "rebuild it")
        try:
            heads = [HeadChoice(**h) for h in d["heads"]]
            return cls(
                d["model"],
                d["view"],
                float(d["budget"]),
                d["damage"],
                int(d["seq_len"]),
                tuple(d["query_range"]),
                tuple(d["key_range"]),
                bool(d["causal"]),
                dict(d["settings"]),
                heads,
                dict(d.get("solver", {})),
                d.get("n_heads"),
                d.get("scope", "view"),
                d.get("cost", "macs"),
                d.get("device"),
            )
        except (KeyError, TypeError) as err:
            raise InputError(source, f"not a plan file ({err})", "write plans with write_plan") from err


def write_plan(plan: Plan, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plan.to_dict(), indent=1))
    tmp.replace(path)  # never a half-written plan that looks complete


def read_plan(path) -> Plan:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(
            str(path), f"cannot read the plan ({err})", "point to a plan file written by the pipeline"
        ) from err
    return Plan.from_dict(d, str(path))


def uniform_plan(template: Plan, method: str, strategy: str, s: int, cost_share: float) -> Plan:
    """The plan that runs one method on every head of ``template`` (a single method as a plan)."""
    heads = [HeadChoice(h.layer, h.head, method, strategy, int(s), float(cost_share), 0.0, 0.0) for h in template.heads]
    return Plan(
        template.model,
        template.view,
        float(cost_share),
        f"single:{method}/{strategy}/{s}",
        template.seq_len,
        template.query_range,
        template.key_range,
        template.causal,
        dict(template.settings),
        heads,
        n_heads=template.n_heads,
        scope=template.scope,
        cost=template.cost,
        device=template.device,
    )


def candidates(recon: pd.DataFrame, methods, sensitivity: pd.Series | None = None, heads=None) -> pd.DataFrame:
    """Per head, each candidate's cost share and fit damage, from a reconstruction table.

    Only rows with ``split == "fit"`` and ``basis_source == "same"`` are read: the choice never sees
    the held-out split. ``methods``: the (estimator, strategy) pairs the plug-in can run (oracles are
    never candidates). ``sensitivity``: per (layer, head), the weight of the ``sensitivity`` damage.
    ``heads``: every (layer, head) of the analysed layers (default: every head the table names, in
    any split). Adds ``exact`` (cost 1, damage 0) for every one of them, so a head whose candidates
    all failed (no finite TV) is still planned, and costed, as exact. Columns: layer, head, estimator, strategy,
    subset_size, cost_share, tv, damage_tv, damage_sensitivity (when weighted).
    """
    need = {"split", "basis_source", "tv", "cost_share", *CANDIDATE_KEYS}
    missing = need - set(recon.columns)
    if missing:
        raise InputError("reconstruction table", f"lacks columns {sorted(missing)}", "re-run reconstruct_view")
    if heads is None:
        heads = recon[["layer", "head"]].drop_duplicates().itertuples(index=False, name=None)
    all_heads = pd.DataFrame(sorted({(int(a), int(b)) for a, b in heads}), columns=["layer", "head"])
    fit = recon[(recon["split"] == "fit") & (recon["basis_source"] == "same")]
    fit = fit[np.isfinite(fit["tv"].to_numpy(float)) & np.isfinite(fit["cost_share"].to_numpy(float))]
    keep = {(e, str(s)) for e, s in methods if e not in ORACLES}
    fit = fit[[(e, str(s)) in keep for e, s in zip(fit["estimator"], fit["strategy"], strict=True)]]
    if fit.empty:
        raise InputError(
            "reconstruction table",
            "has no fit-split rows for the plug-in's methods",
            "run the reconstruction with its fit split (reconstruction.eval_rows) and the plug-in's estimators",
        )
    # a candidate without a finite TV (a failed solve on every row) is never a candidate
    c = fit.groupby(CANDIDATE_KEYS, as_index=False).agg(cost_share=("cost_share", "first"), tv=("tv", "mean"))
    exact = all_heads.assign(estimator=EXACT, strategy="-", subset_size=0, cost_share=1.0, tv=0.0)
    # exact first among equals: a method that computes every key (s = d) costs and damages as much
    c = pd.concat([exact, c], ignore_index=True).sort_values(["layer", "head", "cost_share"], kind="stable")
    c = c.reset_index(drop=True)
    c["damage_tv"] = c["tv"]
    if sensitivity is not None:
        w = c.set_index(["layer", "head"]).index.map(sensitivity)
        if not np.isfinite(np.asarray(w, dtype=float)).all():
            raise InputError(
                "head sensitivity",
                "is missing or not finite for some analysed heads",
                "measure every analysed head (plans.sensitivity_sequences fit sequences)",
            )
        c["damage_sensitivity"] = c["tv"] * np.asarray(w, dtype=float)
    return c


def solve(groups: list[np.ndarray], costs: list[np.ndarray], capacity: float, time_limit: float = 120.0):
    """Multiple-choice knapsack: pick one item per group, total cost ≤ capacity, least total damage.

    ``groups[g]``: the damages of group g's items; ``costs[g]``: their costs. Returns (choice per
    group, info) where info has the solver's status and optimality gap. Exact (HiGHS branch and
    bound, mip_rel_gap 0); raises :class:`ConfigError` when even the cheapest items exceed the
    capacity."""
    if min(float(np.min(c)) for c in costs) < 0:
        raise ValueError("costs must be non-negative")
    cheapest = sum(float(np.min(c)) for c in costs)
    if cheapest > capacity * (1 + 1e-12) + 1e-12:
        raise ConfigError(
            "plans.budgets",
            f"a budget of {capacity:.4g} cost units is below the cheapest plan ({cheapest:.4g})",
            "raise the budget or add cheaper candidates (smaller plugin/reconstruction subset sizes)",
        )
    # an item that costs at least as much as another of its group and damages at least as much is
    # never needed: the integer programme keeps each group's Pareto front only
    fronts = [
        _front(np.asarray(g, dtype=float), np.asarray(c, dtype=float)) for g, c in zip(groups, costs, strict=True)
    ]
    sizes = [len(f) for f in fronts]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    damage = np.concatenate([np.asarray(g, dtype=float)[f] for g, f in zip(groups, fronts, strict=True)])
    cost = np.concatenate([np.asarray(c, dtype=float)[f] for c, f in zip(costs, fronts, strict=True)])
    nvar = len(damage)
    one = np.zeros((len(groups), nvar))
    for g in range(len(groups)):
        one[g, offsets[g] : offsets[g + 1]] = 1.0
    bound = capacity
    for _ in range(3):
        constraints = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(cost[None, :], -np.inf, bound)]
        with c_stdout_to_log():
            res = milp(
                damage,
                constraints=constraints,
                integrality=np.ones(nvar),
                bounds=Bounds(0, 1),
                options={"time_limit": time_limit, "mip_rel_gap": 0.0, "disp": False},
            )
        if res.x is None:
            raise RuntimeError(f"the plan's integer programme found no solution: {res.message}")
        x = np.round(res.x).astype(int)
        choice = np.array([int(fronts[g][np.argmax(x[offsets[g] : offsets[g + 1]])]) for g in range(len(groups))])
        total = sum(float(costs[g][choice[g]]) for g in range(len(groups)))
        if total <= capacity * (1 + 1e-12) + 1e-12:
            break
        # HiGHS accepts a row violation up to its feasibility tolerance (~1e-6): tighten and re-solve,
        # so that a plan never costs more than its budget
        bound -= (total - capacity) + 1e-9 * max(1.0, capacity)
    else:
        raise RuntimeError(f"the plan's solution costs {total:.6g} > capacity {capacity:.6g}")
    info = {
        "status": int(res.status),
        "message": str(res.message),
        "optimal": bool(res.status == 0),
        "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
        "objective": float(sum(float(groups[g][choice[g]]) for g in range(len(groups)))),
        "variables": int(nvar),
        "candidates": int(sum(len(g) for g in groups)),
    }
    return choice, info


@contextlib.contextmanager
def c_stdout_to_log():
    """Send what C code prints on file descriptor 1 inside the block to this module's debug log.

    HiGHS prints some branch-and-bound traces (``HighsMipSolverData::transformNewInteger...``)
    with C's printf whatever its display options, so they would land in the run's console. The
    descriptor is pointed at a temporary file for the solve and restored after it."""
    fd = 1  # C's stdout, whatever Python's sys.stdout is (a notebook or pytest may replace that)
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stdout.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 1 at all: nothing can be printed there
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stdout.flush()
            os.dup2(saved, fd)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace").strip()
    if text:
        log.debug("solver output:\n%s", text)


def _front(damage: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of a group's items that no other item beats on both cost and damage (ties: the first)."""
    order = np.lexsort((damage, cost))
    keep, best = [], np.inf
    for i in order:
        if damage[i] < best:
            keep.append(int(i))
            best = damage[i]
    return np.array(keep, dtype=int)


def brute_force(groups, costs, capacity):
    """The exact answer by enumeration (tests only: the product of the group sizes)."""
    best, arg = np.inf, None
    for pick in itertools.product(*(range(len(g)) for g in groups)):
        c = sum(costs[g][i] for g, i in enumerate(pick))
        if c <= capacity + 1e-12:
            v = sum(groups[g][i] for g, i in enumerate(pick))
            if v < best - 1e-12:
                best, arg = v, pick
    return best, arg


def make_plan(cands: pd.DataFrame, budget: float, damage: str, meta: dict) -> Plan:
    """The plan of least summed ``damage`` (``tv`` or ``sensitivity``) at mean cost share ≤ budget.

    ``meta``: model, view, seq_len, query_range, key_range, causal and settings of the plan, and
    optionally its scope, cost axis (``cost_share`` is then a time share) and device."""
    if damage not in DAMAGES:
        raise ConfigError("plans.damages", f"unknown damage '{damage}'", f"use {' or '.join(DAMAGES)}")
    col = f"damage_{damage}"
    if col not in cands:
        raise InputError("plan candidates", f"have no {damage} damage", "pass the heads' sensitivity")
    if not 0 < budget <= 1:
        raise ConfigError("plans.budgets", f"budget {budget} is outside (0, 1]", "use shares of exact cost in (0, 1]")
    heads = list(cands.groupby(["layer", "head"], sort=True))
    groups = [g[col].to_numpy(float) for _, g in heads]
    costs = [g["cost_share"].to_numpy(float) for _, g in heads]
    choice, info = solve(groups, costs, budget * len(heads))
    out = []
    for (key, g), i in zip(heads, choice, strict=True):
        r = g.iloc[int(i)]
        out.append(
            HeadChoice(
                int(key[0]),
                int(key[1]),
                str(r["estimator"]),
                str(r["strategy"]),
                int(r["subset_size"]),
                float(r["cost_share"]),
                float(r[col]),
                float(r["tv"]),
            )
        )
    return Plan(
        meta["model"],
        meta["view"],
        float(budget),
        damage,
        int(meta["seq_len"]),
        tuple(meta["query_range"]),
        tuple(meta["key_range"]),
        bool(meta["causal"]),
        dict(meta["settings"]),
        out,
        info,
        len(out),
        scope=meta.get("scope", "view"),
        cost=meta.get("cost", "macs"),
        device=meta.get("device"),
    )


def plan_table(plan: Plan) -> pd.DataFrame:
    """One row per head: the plan's choice (the layer x head map's data)."""
    rows = [{**asdict(h), "family": h.family, "budget": plan.budget, "damage_kind": plan.damage} for h in plan.heads]
    return pd.DataFrame.from_records(rows).assign(model=plan.model, view=plan.view)


def is_peer(method: str) -> bool:
    return method in PEERS
