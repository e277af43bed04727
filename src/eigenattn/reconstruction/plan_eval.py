"""The plans job of one model (docs/method.md §13): measure each head on the fit split, choose a
plan per budget and damage, and judge every plan inside the whole model on held-out sequences
against the best single method at a cost at most the plan's, paired per sequence.

1. **Fit side** (the choice): the reconstruction table's fit rows give each candidate's TV per
   head; a :class:`HeadProbe` pass over ``plans.sensitivity_sequences`` fit sequences gives each
   head's first-order sensitivity |∂loss/∂ξ_h| (ξ_h a gate on the head's output; causal: the mean
   NLL of the view's targets; encoder: the pooled embedding's change orthogonal to itself, by
   Hutchinson's estimator with ``plans.probe_vectors`` random directions) and its attention mass
   on the sinks and on the diagonal, and its entropy.
2. **Solve** :func:`eigenattn.reconstruction.plans.make_plan` for each budget and damage.
3. **Held-out side** (the judgement): per sequence, the metric of the exact model, each plan, and
   each plan's best single method. The single method is the plug-in table's best method (oracles
   excluded) whose cost share is at most the plan's: chosen by its held-out plug-in value, the
   strongest cheap baseline.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from tqdm.auto import tqdm

from eigenattn.reconstruction.partial import PROBE_ATTR, attention_modules, detach
from eigenattn.reconstruction.plan_attention import HeadProbe, apply_plan
from eigenattn.reconstruction.plans import Plan, candidates, make_plan, plan_table, uniform_plan, write_plan
from eigenattn.reconstruction.plugin import heldout_ids, load
from eigenattn.spectra.rows import explained_variance, k_at
from eigenattn.storage.store import open_store

log = logging.getLogger(__name__)

FEATURES = ["k90_share", "per_input_quarter", "sink_mass", "diagonal_mass", "entropy", "sensitivity"]
SUMMARY_COLUMNS = [
    "model",
    "view",
    "damage",
    "budget",
    "cost_share",
    "metric",
    "plan_value",
    "exact_value",
    "single_method",
    "single_strategy",
    "single_s",
    "single_cost_share",
    "single_value",
    "gap_recovered",
    "paired_diff",
    "paired_low",
    "paired_high",
    "n_sequences",
    "predicted_damage",
    "solver_optimal",
    "families",
    "plan_file",
    "note",
]


def probe_heads(
    model, layers, ids, causal: bool, q0: int, query_range, sinks: int, vectors: int, seed: int, gradients: bool = True
):
    """Per analysed head: sensitivity, sink mass, diagonal mass and entropy (fit sequences ``ids``).
    Without ``gradients`` (no sensitivity damage asked for) the pass is forward only and the
    sensitivity column is NaN."""
    model.requires_grad_(False)
    mods = attention_modules(model)
    heads = int(model.config.num_attention_heads)
    probes = {}
    for layer in layers:
        probes[layer] = HeadProbe(heads, query_range, sinks, device=ids.device)
        setattr(mods[layer], PROBE_ATTR, probes[layer])
    sens = {layer: torch.zeros(heads, dtype=torch.float64) for layer in layers}
    gen = torch.Generator().manual_seed(int(seed))
    try:
        for i in range(len(ids)):
            x = ids[i : i + 1]
            if not gradients:
                with torch.no_grad():
                    model(input_ids=x)
            elif causal:
                logits = model(input_ids=x).logits[:, q0:-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, q0 + 1 :].reshape(-1)
                )
                loss.backward()
                for layer, p in probes.items():
                    sens[layer] += p.gate.grad.detach().abs().double().cpu()
                    p.gate.grad = None
            else:
                e = model(input_ids=x).last_hidden_state.float().mean(dim=1)[0]
                unit = e.detach() / e.detach().norm()
                for r in range(vectors):
                    v = torch.randn(e.shape[0], generator=gen).to(e.device)
                    v = v - (v @ unit) * unit  # cosine ignores the embedding's own direction
                    (v @ e).backward(retain_graph=r < vectors - 1)
                    for layer, p in probes.items():
                        sens[layer] += (p.gate.grad.detach().double().cpu() / e.detach().norm().double().cpu()) ** 2
                        p.gate.grad = None
    finally:
        detach(model)
    rows = []
    for layer, p in probes.items():
        stats = p.means()
        s = sens[layer] / len(ids)
        if not causal:
            s = torch.sqrt(s / vectors)
        if not gradients:
            s = torch.full_like(s, float("nan"))
        for h in range(heads):
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "sensitivity": float(s[h]),
                    **{k: float(v[h]) for k, v in stats.items()},
                }
            )
    return pd.DataFrame.from_records(rows)


@torch.inference_mode()
def per_sequence(model, ids, causal: bool, q0: int, batch_size: int, exact=None) -> np.ndarray:
    """Causal: each sequence's mean NLL over the view's targets. Encoder: each sequence's pooled
    embedding (``exact`` None) or its cosine to ``exact``'s."""
    out = []
    for i in range(0, len(ids), batch_size):
        x = ids[i : i + batch_size]
        if causal:
            lp = torch.log_softmax(model(input_ids=x).logits[:, q0:-1].float(), dim=-1)
            out.append((-lp.gather(-1, x[:, q0 + 1 :, None]).squeeze(-1)).mean(-1).double().cpu())
        else:
            out.append(model(input_ids=x).last_hidden_state.float().mean(dim=1).cpu())
    res = torch.cat(out)
    if causal or exact is None:
        return res.numpy() if causal else res
    return torch.nn.functional.cosine_similarity(res, exact, dim=-1).double().numpy()


def aggregate(values: np.ndarray, causal: bool) -> float:
    """Perplexity over the sequences (equal target counts: exp of the mean NLL), or the mean cosine."""
    return float(np.exp(values.mean())) if causal else float(values.mean())


def paired_interval(better: np.ndarray, worse: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean paired difference ``better − worse`` (positive: the first is better) and its Student-t
    interval over sequences (the independent unit)."""
    d = np.asarray(better, float) - np.asarray(worse, float)
    m = float(d.mean())
    if len(d) < 2:
        return m, -math.inf, math.inf
    se = float(d.std(ddof=1) / math.sqrt(len(d)))
    q = float(sps.t.ppf(1 - alpha / 2, len(d) - 1))
    return m, m - q * se, m + q * se


def best_single(plugin: pd.DataFrame, cost_share: float, causal: bool):
    """The plug-in table's best single method (no oracle) at cost share ≤ ``cost_share``, or None."""
    p = plugin[(plugin["family"] != "oracle") & (plugin["cost_share"] <= cost_share + 1e-12)]
    if p.empty:
        return None
    return p.sort_values("value", ascending=causal, kind="stable").iloc[0]


def row_k90_share(rows_store, layers) -> pd.DataFrame:
    """k90/d of each head's row covariance, from rows.zarr's eigenvalues (row-centred rows where the
    store has them, else raw), as the spectrum table computes it (docs/method.md §3)."""
    g = open_store(rows_store)
    variant = "row_centered" if "row_centered" in g else "raw"
    lam = np.asarray(g[f"{variant}/eigenvalues"][...], dtype=np.float64)  # (L, H, d)
    k90 = k_at(explained_variance(np.clip(lam, 0, None)), 0.9)
    L, H, d = lam.shape
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(layers, dtype=int), H),
            "head": np.tile(np.arange(H), L),
            "k90_share": (k90 / d).reshape(-1),
            "k90_variant": variant,
        }
    )


def head_features(probe: pd.DataFrame, k90: pd.DataFrame | None, per_input: pd.DataFrame | None) -> pd.DataFrame:
    """Per head, the measurements a choice is related to (FEATURES)."""
    f = probe.copy()
    if k90 is not None:
        f = f.merge(k90[["layer", "head", "k90_share"]], on=["layer", "head"], how="left")
    else:
        f["k90_share"] = np.nan
    if per_input is not None:
        pi = per_input[["layer", "head", "value_at_quarter"]].rename(columns={"value_at_quarter": "per_input_quarter"})
        f = f.merge(pi, on=["layer", "head"], how="left")
    else:
        f["per_input_quarter"] = np.nan
    return f


def predictors(heads: pd.DataFrame, seed: int) -> pd.DataFrame:
    """What predicts the choice, per plan: Spearman's ρ of each feature with the chosen cost share,
    and a small classifier's (logistic regression on standardised features) cross-validated
    accuracy at predicting the chosen method (exact, nystrom, sink_window, ...), beside the
    majority rate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for (damage, budget), g in heads.groupby(["damage_kind", "budget"]):
        feats = [c for c in FEATURES if c in g and g[c].notna().all()]
        rec = {"damage": damage, "budget": budget, "heads": len(g)}
        for c in feats:
            rho, p = sps.spearmanr(g[c], g["cost_share"])
            rec[f"rho_{c}"], rec[f"p_{c}"] = float(rho), float(p)
        # methods given to fewer than 5 heads are one class, "other": each class then fills 5 folds
        counts = g["method"].value_counts()
        label = g["method"].where(g["method"].map(counts) >= 5, "other")
        counts = label.value_counts()
        rec["majority_rate"] = float(counts.iloc[0] / len(g))
        if counts.get("other", 5) < 5:  # too few heads even together: left out of the classifier
            keep = (label != "other").to_numpy()
            g, label = g[keep], label[keep]
            counts = label.value_counts()
        folds = int(min(5, counts.min())) if len(counts) > 1 else 0
        if folds >= 2 and feats:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            rec["classifier_accuracy"] = float(cross_val_score(clf, g[feats].to_numpy(), label, cv=cv).mean())
            rec["classifier_folds"] = folds
        else:
            rec["classifier_accuracy"], rec["classifier_folds"] = np.nan, folds
        rows.append(rec)
    return pd.DataFrame.from_records(rows)


def run_plans(
    model_dir,
    stats,
    recon: pd.DataFrame,
    plugin: pd.DataFrame,
    fit_shards,
    heldout_shards,
    settings,
    plugin_settings,
    *,
    device,
    out_dir,
    per_input: pd.DataFrame | None = None,
    progress: bool = True,
):
    """Plans for every budget and damage, written to ``out_dir/{damage}-{budget}.json``; returns
    (summary, heads, predictors, per-sequence values)."""
    from pathlib import Path

    out_dir = Path(out_dir)
    ps = plugin_settings.peer_settings
    methods = [(e, st) for e in plugin_settings.estimators for st in plugin_settings.strategies]
    methods += [(m, v) for m in ps.methods for v in ps.variants(m)]
    device = torch.device(device)
    model = load(model_dir, stats.causal, device)
    q0 = stats.query_range[0]
    fit_ids = torch.from_numpy(heldout_ids(fit_shards, settings.sensitivity_sequences).astype(np.int64)).to(device)
    stats.check_matches(fit_ids.shape[1], f"fit tokens {fit_shards[0]}")
    t0 = time.perf_counter()
    probe = probe_heads(
        model,
        stats.layers,
        fit_ids,
        stats.causal,
        q0,
        stats.query_range,
        ps.sinks,
        settings.probe_vectors,
        settings.seed,
        gradients="sensitivity" in settings.damages,
    )
    log.info("head probe over %d fit sequences: %.1f s", len(fit_ids), time.perf_counter() - t0)
    sensitivity = probe.set_index(["layer", "head"])["sensitivity"]
    cands = candidates(recon, methods, sensitivity if "sensitivity" in settings.damages else None)
    meta = {
        "model": stats.model,
        "view": stats.view,
        "seq_len": stats.seq_len,
        "query_range": stats.query_range,
        "key_range": stats.key_range,
        "causal": stats.causal,
        "settings": {
            "ridge": plugin_settings.ridge,
            "rank": plugin_settings.rank,
            "seed": plugin_settings.seed,
            "q_last": ps.q_last,
            "sinks": ps.sinks,
        },
    }
    plans: list[Plan] = []
    summary = []
    cheapest = float(cands.groupby(["layer", "head"]).cost_share.min().mean())
    for damage in settings.damages:
        for budget in settings.budgets:
            if budget < cheapest - 1e-12:  # defaults adapt: a budget no plan can meet is reported, not fatal
                note = (
                    f"no plan within budget {budget:g}: the cheapest candidates cost {cheapest:.4f} of exact "
                    "(add smaller reconstruction.subset_sizes, or raise plans.budgets)"
                )
                log.warning(note)
                metric = "perplexity" if stats.causal else "embedding_cosine"
                summary.append(
                    {"model": stats.model, "view": stats.view, "damage": damage, "budget": budget}
                    | {"metric": metric, "note": note}
                )
                continue
            plan = make_plan(cands, budget, damage, meta)
            write_plan(plan, out_dir / f"{damage}-{budget:g}.json")
            plans.append(plan)
            log.info(
                "plan %s: cost share %.4f, %s",
                plan.label(),
                plan.cost_share,
                json.dumps(_families(plan), sort_keys=True),
            )
    ids = torch.from_numpy(heldout_ids(heldout_shards, plugin_settings.n_sequences).astype(np.int64)).to(device)
    stats.check_matches(ids.shape[1], f"held-out tokens {heldout_shards[0]}")
    bs = plugin_settings.batch_size
    exact_raw = per_sequence(model, ids, stats.causal, q0, bs)
    exact = exact_raw if stats.causal else np.ones(len(ids))
    ref = None if stats.causal else exact_raw

    def run(plan):
        try:
            apply_plan(model, plan, stats=stats)
            return per_sequence(model, ids, stats.causal, q0, bs, exact=ref)
        finally:
            detach(model)

    per_seq = {"exact": exact}
    singles: dict[tuple, np.ndarray] = {}
    for plan in tqdm(plans, desc=f"plans {stats.model}", disable=not progress):
        values = run(plan)
        per_seq[plan.label()] = values
        best = best_single(plugin, plan.cost_share, stats.causal)
        rec = {
            "model": stats.model,
            "view": stats.view,
            "damage": plan.damage,
            "budget": plan.budget,
            "cost_share": plan.cost_share,
            "metric": "perplexity" if stats.causal else "embedding_cosine",
            "plan_value": aggregate(values, stats.causal),
            "exact_value": aggregate(exact, stats.causal),
            "n_sequences": len(ids),
            "predicted_damage": plan.predicted_damage,
            "solver_optimal": plan.solver.get("optimal"),
            "families": json.dumps(_families(plan), sort_keys=True),
            "plan_file": str(out_dir / f"{plan.damage}-{plan.budget:g}.json"),
        }
        if best is not None:
            key = (best["estimator"], str(best["strategy"]), int(best["subset_size"]))
            if key not in singles:
                singles[key] = run(uniform_plan(plan, *key, float(best["cost_share"])))
                per_seq[f"single:{key[0]}/{key[1]}/{key[2]}"] = singles[key]
            sv = singles[key]
            single_value = aggregate(sv, stats.causal)
            # positive = the plan is better: lower NLL (causal), higher cosine (encoder)
            diff = paired_interval(sv, values) if stats.causal else paired_interval(values, sv)
            gap = (
                (single_value - rec["plan_value"]) / (single_value - rec["exact_value"])
                if single_value != rec["exact_value"]
                else np.nan
            )
            rec.update(
                {
                    "single_method": key[0],
                    "single_strategy": key[1],
                    "single_s": key[2],
                    "single_cost_share": float(best["cost_share"]),
                    "single_value": single_value,
                    "gap_recovered": gap,
                    "paired_diff": diff[0],
                    "paired_low": diff[1],
                    "paired_high": diff[2],
                }
            )
            if abs(single_value - float(best["value"])) > 1e-3 * max(1.0, abs(single_value)):
                log.warning("single method %s: %.5f here, %.5f in the plug-in table", key, single_value, best["value"])
        summary.append(rec)
    feats = head_features(probe, row_k90_share(stats.path, stats.layers), per_input)
    if plans:
        heads = pd.concat([plan_table(p) for p in plans], ignore_index=True)
        heads = heads.merge(feats, on=["layer", "head"], how="left")
        pred = predictors(heads, settings.seed).assign(model=stats.model, view=stats.view)
    else:  # no budget could be met: the summary says so; the plans folder stays empty
        out_dir.mkdir(parents=True, exist_ok=True)
        heads = feats.assign(model=stats.model, view=stats.view).iloc[:0]
        pred = pd.DataFrame(columns=["damage", "budget", "heads", "model", "view"])
    seq = pd.DataFrame(per_seq).rename_axis("sequence").reset_index().assign(model=stats.model)
    return pd.DataFrame.from_records(summary, columns=SUMMARY_COLUMNS), heads, pred, seq


def _families(plan: Plan) -> dict:
    out: dict[str, int] = {}
    for h in plan.heads:
        key = h.method if h.method == "exact" else f"{h.method}/{h.strategy}/{h.s}"
        out[key] = out.get(key, 0) + 1
    return out
