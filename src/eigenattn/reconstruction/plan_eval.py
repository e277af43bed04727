"""The plans job of one model (docs/method.md §13): measure each head on the fit split, choose a
plan per budget and damage, and judge every plan inside the whole model on held-out documents
against the best single method at equal cost.

1. **Fit side** (the choice): the reconstruction table's fit rows give each candidate's TV per
   head; a :class:`HeadProbe` pass over ``plans.sensitivity_sequences`` fit sequences gives each
   head's first-order sensitivity |∂loss/∂ξ_h| (ξ_h a gate on the head's output; causal: the mean
   NLL of the view's targets; encoder: the pooled embedding's change orthogonal to itself, by
   Hutchinson's estimator with ``plans.probe_vectors`` random directions) and its attention mass
   on the sinks and on the diagonal, and its entropy.
2. **Solve** :func:`eigenattn.reconstruction.plans.make_plan` for each budget and damage.
3. **The comparator, at equal cost and chosen on the fit split.** For each plan, every single
   method of the plan's own candidate grid (each paper estimator with its strategy, each peer)
   runs in the whole model at the largest s whose cost share is at most the plan's budget
   (:func:`equal_cost_singles`; the plan's own cost is at most that budget too, so a comparator
   may cost a little more than the plan, never less than the grid allows: that only makes the
   plan's claim harder). Each runs on ``plugin.n_sequences`` **fit** passages (spread
   over documents); the best of them there is the comparator (:func:`best_single`). The held-out
   text never chooses it. Its cost as a share of the plan's is reported (``single_cost_ratio``),
   beside that of the dearest single method the grid holds within the budget
   (``grid_cost_ratio``): below ``EQUAL_COST`` the grid cannot match the plan's cost, and the row
   says so.
4. **Held-out side** (the judgement): ``plugin.n_sequences`` held-out passages spread over
   documents; per sequence, the metric of the exact model, each plan and its comparator. The
   paired difference is averaged within each document and judged with Student's t over documents
   (:mod:`eigenattn.reconstruction.intervals`); the rows of one model are a family, adjusted by
   Holm (``p_holm``).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from tqdm.auto import tqdm

from eigenattn.errors import InputError
from eigenattn.reconstruction.cost import ORACLES, with_time
from eigenattn.reconstruction.intervals import DocumentInterval, holm, paired_interval
from eigenattn.reconstruction.partial import PROBE_ATTR, attention_modules, detach
from eigenattn.reconstruction.plan_attention import HeadProbe, apply_plan
from eigenattn.reconstruction.plans import EXACT, Plan, candidates, make_plan, plan_table, uniform_plan, write_plan
from eigenattn.reconstruction.plugin import heldout_ids, heldout_selection, load, sequence_outputs
from eigenattn.spectra.rows import explained_variance, k_at
from eigenattn.storage.store import open_store

log = logging.getLogger(__name__)

FEATURES = ["k90_share", "per_input_quarter", "sink_mass", "diagonal_mass", "entropy", "sensitivity"]
EQUAL_COST = 0.9  # a comparator costing less than this share of the plan is not at equal cost
SUMMARY_COLUMNS = [
    "model",
    "view",
    "damage",
    "budget",
    "cost_share",
    "scope",
    "cost_axis",
    "seq_len",
    "metric",
    "plan_value",
    "exact_value",
    "single_method",
    "single_strategy",
    "single_s",
    "single_cost_share",
    "single_cost_ratio",
    "grid_cost_ratio",
    "single_fit_value",
    "single_value",
    "comparators",
    "gap_recovered",
    "paired_diff",
    "paired_low",
    "paired_high",
    "p_value",
    "p_holm",
    "n_sequences",
    "n_documents",
    "fit_sequences",
    "fit_documents",
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


def per_sequence(model, ids, causal: bool, q0: int, batch_size: int, exact=None) -> np.ndarray:
    """Causal: each sequence's mean NLL over the view's targets. Encoder: each sequence's pooled
    embedding (``exact`` None) or its cosine to ``exact``'s. The plug-in computes them alike
    (:func:`eigenattn.reconstruction.plugin.sequence_outputs`)."""
    res = sequence_outputs(model, ids, causal, q0, batch_size)
    if causal or exact is None:
        return res
    return torch.nn.functional.cosine_similarity(res, exact, dim=-1).double().numpy()


def aggregate(values: np.ndarray, causal: bool) -> float:
    """Perplexity over the sequences (equal target counts: exp of the mean NLL), or the mean cosine."""
    return float(np.exp(values.mean())) if causal else float(values.mean())


def equal_cost_singles(table: pd.DataFrame, cost_share: float) -> pd.DataFrame:
    """Every single method of ``table`` (columns estimator, strategy, subset_size, cost_share; the
    plan's candidate grid) at the largest s whose cost share is at most ``cost_share``: one row per
    (estimator, strategy) that has such an s. Oracles and exact are never single methods."""
    t = table[~table["estimator"].isin([*ORACLES, EXACT])]
    t = t[t["cost_share"].to_numpy(float) <= cost_share + 1e-12]
    if t.empty:
        return t
    t = t.sort_values(["estimator", "strategy", "subset_size"], kind="stable")
    return t.groupby(["estimator", "strategy"], sort=False, as_index=False).tail(1).reset_index(drop=True)


def best_single(table: pd.DataFrame, cost_share: float, causal: bool):
    """The comparator of a plan costing ``cost_share``: among :func:`equal_cost_singles` of
    ``table`` (which needs a ``value`` column: each method's **fit**-split value), the lowest
    perplexity (causal) or highest cosine (encoder); ties go to the dearer. None when no single
    method costs as little as the plan."""
    t = equal_cost_singles(table, cost_share)
    if t.empty:
        return None
    t = t.assign(_v=t["value"] if causal else -t["value"]).sort_values(["_v", "cost_share"], ascending=[True, False])
    return t.drop(columns="_v").iloc[0]


def gap_recovered(plan_value: float, single_value: float, exact_value: float, behind: DocumentInterval):
    """(share of the gap between the single method and exact that the plan recovers, note).

    ``(single − plan) / (single − exact)`` in the metric's units (perplexity, or cosine with exact
    at 1). ``behind``: the interval of how far the single method is behind exact per sequence (NLL
    or cosine); when that distance is within its half-width the single method is within noise of
    exact, and the share is undefined (NaN, and the note says why)."""
    if not np.isfinite(behind.estimate) or abs(behind.estimate) <= behind.half_width or single_value == exact_value:
        note = (
            f"gap recovered undefined: the single method is within noise of exact "
            f"(Δ {behind.estimate:+.4g}, 95% half-width {behind.half_width:.4g} over {behind.n_documents} documents)"
        )
        return np.nan, note
    return float((single_value - plan_value) / (single_value - exact_value)), ""


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
    passages=None,
    progress: bool = True,
    latency: pd.DataFrame | None = None,
):
    """Plans for every budget and damage, written to ``out_dir/{damage}-{budget}.json``; returns
    (summary, heads, predictors, per-sequence values). ``passages``: the sampled passages table
    (path or DataFrame), whose documents are the unit of the intervals and spread the evaluated
    passages (without it every sequence is its own document). ``latency``: the view's latency
    table, which prices every candidate by its measured time when ``settings.cost`` is ``time``
    (a candidate without a kernel, the oracle, is then no candidate)."""
    from pathlib import Path

    out_dir = Path(out_dir)
    ps = plugin_settings.peer_settings
    methods = [(e, st) for e in plugin_settings.estimators for st in plugin_settings.strategies]
    methods += [(m, v) for m in ps.methods for v in ps.variants(m)]
    device = torch.device(device)
    model = load(model_dir, stats.causal, device)
    whole = settings.scope == "whole" and stats.causal
    # whole scope: the plans run every query and are judged on every position's next token, and
    # the heads' sensitivity is that loss's
    q0 = 0 if whole else stats.query_range[0]
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
    all_heads = [(int(layer), h) for layer in stats.layers for h in range(int(model.config.num_attention_heads))]
    device_name = None
    if settings.scope == "whole" and not stats.causal:
        log.warning("plans.scope is whole, but %s is an encoder: its plans stay in view scope", stats.model)
    if whole:
        cands, device_name = whole_candidates(model, fit_ids, stats, settings, ps, device, out_dir)
    elif settings.cost == "time":
        if latency is None or not len(latency):
            raise InputError("plans.cost", "is time, but no latency table was given", "pass the view's latency table")
        timed = with_time(recon, latency)
        recon = timed[timed["time_share"].notna()].assign(cost_share=lambda d: d["time_share"])
        device_name = str(latency["device"].iloc[0])
        log.info("candidates priced by measured time at n = %d on %s", int(latency["n"].iloc[0]), device_name)
    if whole:
        if "sensitivity" in settings.damages:
            weight = sensitivity.reindex(pd.MultiIndex.from_frame(cands[["layer", "head"]])).to_numpy()
            if not np.isfinite(weight).all():
                raise InputError(
                    "plans.damages",
                    f"sensitivity is missing for {int((~np.isfinite(weight)).sum())} whole-scope candidates",
                    "measure every analysed head (plans.sensitivity_sequences fit sequences)",
                )
            cands = cands.assign(damage_sensitivity=cands["damage_tv"].to_numpy() * weight)
    else:
        cands = candidates(recon, methods, sensitivity if "sensitivity" in settings.damages else None, heads=all_heads)
    meta = {
        "model": stats.model,
        "view": "whole" if whole else stats.view,
        "seq_len": stats.seq_len,
        "query_range": (0, stats.seq_len) if whole else stats.query_range,
        "key_range": (0, stats.seq_len) if whole else stats.key_range,
        "causal": stats.causal,
        "scope": "whole" if whole else "view",
        "settings": {
            "ridge": plugin_settings.ridge,
            "rank": plugin_settings.rank,
            "seed": plugin_settings.seed,
            "q_last": ps.q_last,
            "sinks": ps.sinks,
        },
        "cost": settings.cost,
        "device": device_name,
    }
    metric = "perplexity" if stats.causal else "embedding_cosine"
    plans: list[Plan] = []
    summary = []
    cheapest = float(cands.groupby(["layer", "head"]).cost_share.min().mean())
    for damage in settings.damages:
        for budget in settings.budgets:
            if budget < cheapest - 1e-12:  # defaults adapt: a budget no plan can meet is reported, not fatal
                unit = "of exact" if settings.cost == "macs" else "of SDPA's measured time"
                note = f"no plan within budget {budget:g}: the cheapest candidates cost {cheapest:.4f} {unit} " + (
                    "(add smaller reconstruction.subset_sizes, or raise plans.budgets)"
                    if settings.cost == "macs"
                    else "(at short lengths every kernel is bound by call overhead; raise plans.budgets)"
                )
                log.warning(note)
                summary.append(
                    {"model": stats.model, "view": meta["view"], "damage": damage, "budget": budget}
                    | {"metric": metric, "note": note, "scope": meta["scope"]}
                    | {"cost_axis": settings.cost, "seq_len": stats.seq_len}
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
    held = heldout_selection(heldout_shards, plugin_settings.n_sequences, passages)
    fit = heldout_selection(fit_shards, plugin_settings.n_sequences, passages)
    stats.check_matches(held.ids.shape[1], f"held-out tokens {heldout_shards[0]}")
    log.info(
        "judged on %d held-out passages from %d documents; comparators chosen on %d fit passages from %d documents",
        len(held.ids),
        held.n_documents,
        len(fit.ids),
        fit.n_documents,
    )
    ids = torch.from_numpy(held.ids.astype(np.int64)).to(device)
    fit_eval = torch.from_numpy(fit.ids.astype(np.int64)).to(device)
    bs = plugin_settings.batch_size
    exact_raw = per_sequence(model, ids, stats.causal, q0, bs)
    exact = exact_raw if stats.causal else np.ones(len(ids))
    ref = None if stats.causal else exact_raw
    fit_ref = None if stats.causal else per_sequence(model, fit_eval, stats.causal, q0, bs)

    kernels = settings.kernel_mode(device)
    log.info("plans run inside the model on %s kernels (plans.kernels: %s)", kernels, settings.kernels)

    def run(plan, x, reference):
        try:
            apply_plan(model, plan, stats=stats, kernels=kernels)
            return per_sequence(model, x, stats.causal, q0, bs, exact=reference)
        finally:
            detach(model)

    # the plans' own grid: every non-exact candidate's cost share (the same for every head)
    grid = (
        cands[cands["estimator"] != EXACT]
        .groupby(["estimator", "strategy", "subset_size"], as_index=False)
        .agg(cost_share=("cost_share", "max"))
    )
    per_seq = {"passage_id": held.passage_ids, "document": _labels(held), "exact": exact}
    fit_values: dict[tuple, float] = {}
    singles: dict[tuple, np.ndarray] = {}
    for plan in tqdm(plans, desc=f"plans {stats.model}", disable=not progress):
        values = run(plan, ids, ref)
        per_seq[plan.label()] = values
        rec = {
            "model": stats.model,
            "view": meta["view"],
            "scope": meta["scope"],
            "damage": plan.damage,
            "budget": plan.budget,
            "cost_share": plan.cost_share,
            "cost_axis": settings.cost,
            "seq_len": stats.seq_len,
            "metric": metric,
            "plan_value": aggregate(values, stats.causal),
            "exact_value": aggregate(exact, stats.causal),
            "n_sequences": len(ids),
            "n_documents": held.n_documents,
            "fit_sequences": len(fit.ids),
            "fit_documents": fit.n_documents,
            "predicted_damage": plan.predicted_damage,
            "solver_optimal": plan.solver.get("optimal"),
            "families": json.dumps(_families(plan), sort_keys=True),
            "plan_file": str(out_dir / f"{plan.damage}-{plan.budget:g}.json"),
        }
        # every single method at its largest s within the plan's budget (the plan costs at most that)
        cap = max(plan.budget, plan.cost_share)
        comps = equal_cost_singles(grid, cap)
        notes = []
        for c in comps.itertuples():
            key = (c.estimator, str(c.strategy), int(c.subset_size))
            if key not in fit_values:
                v = run(uniform_plan(plan, *key, float(c.cost_share)), fit_eval, fit_ref)
                fit_values[key] = aggregate(v, stats.causal)
                log.info("single %s/%s s=%d on the fit split: %s %.5f", *key, metric, fit_values[key])
        comps = comps.assign(
            value=[
                fit_values[(e, str(st), int(s))] for e, st, s in comps[["estimator", "strategy", "subset_size"]].values
            ]
        )
        best = best_single(comps, cap, stats.causal)
        if best is None:
            notes.append("no single method of the plan's candidate grid fits within the plan's budget")
        else:
            key = (best["estimator"], str(best["strategy"]), int(best["subset_size"]))
            if key not in singles:
                singles[key] = run(uniform_plan(plan, *key, float(best["cost_share"])), ids, ref)
                per_seq[f"single:{key[0]}/{key[1]}/{key[2]}"] = singles[key]
            sv = singles[key]
            single_value = aggregate(sv, stats.causal)
            docs = held.documents
            # positive = the plan is better: lower NLL (causal), higher cosine (encoder)
            diff = paired_interval(sv, values, docs) if stats.causal else paired_interval(values, sv, docs)
            behind = paired_interval(sv, exact, docs) if stats.causal else paired_interval(exact, sv, docs)
            gap, gap_note = gap_recovered(rec["plan_value"], single_value, rec["exact_value"], behind)
            ratio = float(best["cost_share"]) / plan.cost_share
            grid_ratio = float(comps["cost_share"].max()) / plan.cost_share
            if grid_ratio < EQUAL_COST:
                notes.append(
                    f"not at equal cost: the plan's grid has no single method within {EQUAL_COST:.0%} of the plan's "
                    f"cost (the dearest within its budget costs {grid_ratio:.3f} of the plan)"
                )
            elif ratio < EQUAL_COST:
                notes.append(
                    f"the comparator (best on the fit split) costs {ratio:.3f} of the plan; the single methods "
                    f"within {EQUAL_COST:.0%} of the plan's cost did worse on the fit split"
                )
            if gap_note:
                notes.append(gap_note)
            rec.update(
                {
                    "single_method": key[0],
                    "single_strategy": key[1],
                    "single_s": key[2],
                    "single_cost_share": float(best["cost_share"]),
                    "single_cost_ratio": ratio,
                    "grid_cost_ratio": grid_ratio,
                    "single_fit_value": float(best["value"]),
                    "single_value": single_value,
                    "gap_recovered": gap,
                    "paired_diff": diff.estimate,
                    "paired_low": diff.low,
                    "paired_high": diff.high,
                    "p_value": diff.p,
                }
            )
            match = plugin[
                (plugin["estimator"] == key[0])
                & (plugin["strategy"].astype(str) == key[1])
                & (plugin["subset_size"] == key[2])
            ]
            if (
                not whole
                and len(match)
                and abs(single_value - float(match["value"].iloc[0])) > 1e-3 * max(1.0, abs(single_value))
            ):
                log.warning(
                    "single method %s: %.5f here, %.5f in the plug-in table", key, single_value, match["value"].iloc[0]
                )
        rec["comparators"] = json.dumps(
            {
                f"{e}/{st}/{s}": [round(float(c), 6), fit_values[(e, str(st), int(s))]]
                for e, st, s, c in comps[["estimator", "strategy", "subset_size", "cost_share"]].values
            }
        )
        rec["note"] = "; ".join(notes)
        summary.append(rec)
    summary = pd.DataFrame.from_records(summary, columns=SUMMARY_COLUMNS)
    # the C5 rows of one model are one family: Holm's adjustment over the judged ones
    summary["p_holm"] = holm(summary["p_value"].to_numpy(float))
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
    return summary, heads, pred, seq


def whole_candidates(model, fit_ids, stats, settings, ps, device, out_dir):
    """Whole-scope candidates of every head (docs/method.md §15): exact, and each whole-scope peer
    of ``plugin.peers`` at each ``reconstruction.subset_sizes`` s below n, with its damage (mean TV
    over every query of the fit sequences, :func:`eigenattn.reconstruction.whole_plans.whole_damage`)
    and its cost: the whole-scope multiply-add share, or (``plans.cost: time``) the time share of a
    latency table measured here at the model's head shapes and n, written beside the plans
    (``latency.csv``). Returns (candidates, the device that priced them or None)."""
    from pathlib import Path

    from eigenattn.capture.extract import model_facts
    from eigenattn.reconstruction import clock, whole_plans

    peers = [m for m in ps.methods if m in whole_plans.WHOLE_PEERS]
    if not peers:
        raise InputError(
            "plans.scope",
            f"is whole, but plugin.peers holds none of {', '.join(whole_plans.WHOLE_PEERS)}",
            "add sink_window or vertical_slash to plugin.peers",
        )
    n = stats.seq_len
    grid = [(m, s) for m in peers for s in settings.subset_sizes if s < n]
    t0 = time.perf_counter()
    damage = whole_plans.whole_damage(model, fit_ids, grid, sinks=ps.sinks, q_last=ps.q_last, layers=stats.layers)
    log.info("whole-scope damage of %d (method, s) over every query: %.1f s", len(grid), time.perf_counter() - t0)
    facts = model_facts(model)
    heads, d_head = facts["heads"], facts["head_dim"]
    if settings.cost == "time":
        lat = clock.latency_table(
            [n], sorted({s for _, s in grid}), tuple(peers), d_head=d_head, heads=heads,
            threads=torch.get_num_threads(), device=str(device), repeats=5,
            compiled=settings.kernel_mode(device) == "compiled",
            sinks=ps.sinks, q_last=ps.q_last, pinv="iterative", seed=settings.seed, inputs="local",
        )  # fmt: skip
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        lat.to_csv(Path(out_dir) / "latency.csv", index=False)
        device_name = str(lat["device"].iloc[0])
    else:
        rows = [
            {"method": m, "s": s, "n": n, "time_share": clock.macs_share(m, n=n, d_head=d_head, s=s, q_last=ps.q_last)}
            for m, s in grid
        ]
        lat, device_name = pd.DataFrame(rows), None
    cands = whole_plans.candidates(damage, lat, n)
    return cands.assign(tv=cands["damage_tv"]), device_name


def _labels(sel) -> np.ndarray:
    """The selection's document labels, or the sequence index where they are unknown."""
    return sel.documents if sel.documents is not None else np.arange(len(sel.ids)).astype(str)


def _families(plan: Plan) -> dict:
    out: dict[str, int] = {}
    for h in plan.heads:
        key = h.method if h.method == "exact" else f"{h.method}/{h.strategy}/{h.s}"
        out[key] = out.get(key, 0) + 1
    return out
