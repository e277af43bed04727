"""Whole-scope plans priced by the clock (docs/method.md §15): each head of a causal model runs
exact attention, sink + window or vertical-slash on **every** query, as a deployed decoder would,
and a plan's budget is a share of SDPA's measured time.

- **Damage** (:func:`whole_damage`): a head's mean total-variation distance over every query of
  the fit text between its exact attention row and the method's. Both sparse methods renormalise
  the softmax over the keys they keep, so for a row p with kept keys K the distance is exactly
  ``1 − Σ_{j∈K} p_j``, the probability mass the method drops. The keys are the kernels' own:
  :func:`eigenattn.reconstruction.peers.sink_window_whole_keys` and the vertical-slash index
  computed from the head's Q and K (:func:`eigenattn.reconstruction.kernels.vertical_slash_index`).
- **Cost**: each (method, s)'s time share of SDPA at the model's head shapes and length, from the
  latency table (:func:`eigenattn.reconstruction.clock.latency_table`) measured on this device;
  exact costs 1.
- **The plan** (:func:`whole_plan`): the multiple-choice knapsack of
  :func:`eigenattn.reconstruction.plans.make_plan` on those costs, so its mean time share never
  exceeds the budget by the table's own numbers.
"""

from __future__ import annotations

import pandas as pd
import torch

from eigenattn.capture.attention import expand_heads
from eigenattn.capture.interface import IGNORED_KWARGS, check_kwargs, register_backend
from eigenattn.reconstruction import kernels as K
from eigenattn.reconstruction.peers import sink_window_whole_keys
from eigenattn.reconstruction.plans import EXACT, WHOLE_METHODS, Plan, make_plan

WHOLE_PEERS = tuple(sorted(WHOLE_METHODS - {EXACT}))
_RECORD_IMPL = "eigenattn_qk_record"
_recorded: dict = {}


def _record_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Exact SDPA attention that also hands each layer's Q and K (keys repeated per query head)
    to the damage callback; nothing is kept. Softcapping, sliding windows and sinks would change
    the rows the damage is measured on, so they are refused, never dropped."""
    from torch.nn import functional as F

    check_kwargs(module, kwargs, IGNORED_KWARGS, _RECORD_IMPL)
    key, value, scaling = expand_heads(query, key, value, scaling)
    cb = _recorded.get("callback")
    if cb is not None:
        cb(int(module.layer_idx), query.detach(), key.detach(), float(scaling))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def kept_mass(P: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per row, the probability mass on the kept keys (P, keep: (..., n, n))."""
    return (P * keep).sum(-1)


def head_damages(q, k, scale: float, grid, *, sinks: int, q_last: int) -> list[dict]:
    """Each head's whole-scope damage (mean over every query of 1 − kept mass) for every
    (method, s) of ``grid``, from one sequence's Q and K (H, n, dh) of one layer."""
    H, n, _ = q.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
    rows = []
    sw_keep = {s: sink_window_whole_keys(n, s, sinks).to(q.device) for m, s in grid if m == "sink_window"}
    for h in range(H):
        S = (q[h] @ k[h].T) * scale
        P = torch.softmax(S.masked_fill(~causal, float("-inf")), dim=-1)
        for method, s in grid:
            if method == "sink_window":
                keep = sw_keep[s]
            elif method == "vertical_slash":
                index = K.vertical_slash_index(q[h][None], k[h][None], s, q_last, scale)
                keep = K.vs_index_mask(index, n)[0]
            else:
                raise ValueError(f"{method} is not a whole-scope peer ({', '.join(WHOLE_PEERS)})")
            rows.append(
                {"head": h, "estimator": method, "subset_size": int(s), "tv": float(1 - kept_mass(P, keep).mean())}
            )
    return rows


@torch.inference_mode()
def whole_damage(
    model, ids: torch.Tensor, grid, *, sinks: int, q_last: int, layers=None, progress=None
) -> pd.DataFrame:
    """Per (layer, head, method, s): the damage averaged over the sequences ``ids`` (B, n) of a
    causal ``transformers`` model (run once per sequence on a recording SDPA backend; the model's
    own attention implementation is restored after). ``layers``: the layers to measure (default:
    every layer)."""
    grid = [(m, int(s)) for m, s in grid if int(s) < ids.shape[1]]
    keep = None if layers is None else {int(x) for x in layers}
    impl = model.config._attn_implementation
    rows = []

    def callback(layer, q, k, scale):
        if keep is not None and layer not in keep:
            return
        for r in head_damages(q[0].float(), k[0].float(), scale, grid, sinks=sinks, q_last=q_last):
            rows.append({"layer": layer, **r})
        if progress is not None:
            progress(layer)

    register_backend(_RECORD_IMPL, _record_forward)
    model.set_attn_implementation(_RECORD_IMPL)
    _recorded["callback"] = callback
    try:
        for b in range(ids.shape[0]):
            model(input_ids=ids[b : b + 1])
    finally:
        _recorded.pop("callback", None)
        model.set_attn_implementation(impl)
    table = pd.DataFrame(rows)
    return table.groupby(["layer", "head", "estimator", "subset_size"], as_index=False)["tv"].mean()


def candidates(damage: pd.DataFrame, latency: pd.DataFrame, n: int) -> pd.DataFrame:
    """Per head: exact (cost 1, damage 0) and each (method, s) priced by its time share at ``n``
    (the latency table's rows of that length), in :func:`make_plan`'s candidate columns."""
    lat = latency[latency["n"] == n].set_index(["method", "s"])["time_share"]
    missing = sorted({(m, s) for m, s in zip(damage.estimator, damage.subset_size, strict=True)} - set(lat.index))
    if missing:
        raise ValueError(f"the latency table at n = {n} has no time for {missing}")
    d = damage.assign(
        cost_share=[float(lat[(m, s)]) for m, s in zip(damage.estimator, damage.subset_size, strict=True)],
        strategy="-",
    )
    heads = d[["layer", "head"]].drop_duplicates()
    exact = heads.assign(estimator=EXACT, strategy="-", subset_size=0, cost_share=1.0, tv=0.0)
    out = pd.concat([d, exact], ignore_index=True)
    return out.assign(damage_tv=out["tv"]).sort_values(["layer", "head", "cost_share"], ignore_index=True)


def whole_plan(cands: pd.DataFrame, budget: float, *, model: str, n: int, settings: dict, device: str) -> Plan:
    """The whole-scope plan of least summed damage at mean time share ≤ ``budget``."""
    meta = {
        "model": model,
        "view": "whole",
        "seq_len": n,
        "query_range": (0, n),
        "key_range": (0, n),
        "causal": True,
        "settings": settings,
        "scope": "whole",
        "cost": "time",
        "device": device,
    }
    return make_plan(cands, budget, "tv", meta)


def best_single(cands: pd.DataFrame, cost: float) -> tuple[str, int, float, float]:
    """The single method (one method and s on every head) of least summed fit damage among those
    whose time share is at most ``cost``: (method, s, time share, summed damage)."""
    single = cands[cands.estimator != EXACT].groupby(["estimator", "subset_size"], as_index=False)
    table = single.agg(cost_share=("cost_share", "max"), damage=("tv", "sum"))
    ok = table[table.cost_share <= cost + 1e-12]
    if ok.empty:
        raise ValueError(f"no single method costs at most {cost:.3f} of SDPA's time")
    r = ok.sort_values(["damage", "cost_share"]).iloc[0]
    return str(r.estimator), int(r.subset_size), float(r.cost_share), float(r.damage)
