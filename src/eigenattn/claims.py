"""The claims table (docs/method.md §9), computed from the pipeline's CSV outputs.

Every row states a measured value, its spread, a ``state`` (supported, not supported,
inconclusive, or reference for rows that only set a baseline), a verdict in words, and the caveat
that qualifies it. Each state can come out either way: a value that cannot answer its question
(bounded by the sample count, noise-level subspaces, an exact model that has not learned, an
interval too wide) is ``inconclusive`` rather than read as support. The thresholds are the
``claims:`` section of the config (see :data:`DEFAULTS`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from .figures import iqr
from .stats import accuracy_difference, learned_margins, order_gain

COLUMNS = ["claim", "model", "view", "variant", "k", "s", "mode", "method", "scope", "quantity", "value", "spread",
           "state", "verdict", "caveat", "source"]
STATES = ("supported", "not supported", "inconclusive", "reference")
DEFAULTS = {"k_report": 16, "s_report": 16, "c1_max_k90_share": 0.5, "c2_min_ratio_random": 2.0,
            "c3_min_gain": 0.05, "c3_alpha": 0.05, "c4_min_kept_gain": 0.5}
BASELINES = ("mean", "subset_only")

CAVEAT_RAW = ("raw rows keep each row's own offset, which softmax ignores; its constant direction can dominate "
              "(median |<u1, 1/sqrt(d)>| = {u1:.2f}); see row_centered")
CAVEAT_PREFIX_CENTERED = ("prefix view: rows also have keys outside the view, so row centring removes a "
                          "softmax-invariant offset only approximately")
CAVEAT_CROSS = ("keys are compared by position, but the two models tokenise the same passages differently, "
                "so key j is not the same token in both")


def _row(claim, source, **kw) -> dict:
    return {"claim": claim, "source": str(source), **kw}


def _caveat_rows(variant: str, view: str, u1: float | None = None) -> str:
    parts = []
    if variant == "raw" and u1 is not None:
        parts.append(CAVEAT_RAW.format(u1=u1))
    if variant == "row_centered" and view == "prefix":
        parts.append(CAVEAT_PREFIX_CENTERED)
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------- C1


def c1_rows(spectra, cfg: dict) -> list[dict]:
    """k90 of score rows (share of d) and of whole view blocks, per model, view and variant."""
    out = []
    share = cfg["c1_max_k90_share"]
    for p in spectra:
        sp = pd.read_csv(p)
        heads = sp[sp["head"] != "pooled"]
        for (analysis, v), x in heads.groupby(["analysis", "variant"], sort=False):
            model, view, d, N = x.model.iloc[0], x.view.iloc[0], int(x.d.iloc[0]), int(x.n_samples.iloc[0])
            bounded = float(x.bounded_k90.mean())
            q25, q50, q75 = iqr(x.k90 / x.d)
            base = dict(model=model, view=view, variant=v, source=p,
                        caveat=_caveat_rows(v, view, float(x.u1_constant.median()) if analysis == "rows" else None))
            if analysis == "rows":
                row = dict(scope=f"rows (d={d}, {len(x)} heads)", quantity="median k90/d over heads", value=q50,
                           spread=f"IQR {q25:.2f}–{q75:.2f}")
            else:
                k = x.k90.median()
                row = dict(scope=f"full matrices (dim {d}, N={N}, {len(x)} heads)",
                           quantity=f"median k90 over heads (rank at most N−1 = {N - 1})", value=float(k),
                           spread=f"IQR {x.k90.quantile(0.25):.0f}–{x.k90.quantile(0.75):.0f}; "
                                  f"{bounded:.0%} of heads bounded by N")
            if bounded > 0.5:
                state = "inconclusive"
                verdict = (f"bounded by the sample count (N = {N}): for most heads k90 is only a lower bound; "
                           "more sequences are needed")
            elif q50 < share:
                state, verdict = "supported", f"low-dimensional: median k90 < {share:g}·d"
            else:
                state, verdict = "not supported", f"not low-dimensional: median k90 ≥ {share:g}·d"
            out.append(_row("C1", **base, **row, state=state, verdict=verdict))
    return out


def c1_scaling_rows(fits, saturations, tables) -> list[dict]:
    """C1 from the scaling study: the exponent of k90 against n (rows), and whether full-matrix
    k90 has saturated at the largest N of the sample sweep."""
    out = []
    for fp, sp, tp in zip(fits, saturations, tables):
        fit, sat, table = pd.read_csv(fp), pd.read_csv(sp), pd.read_csv(tp)
        for r in fit[fit.scope == "medians"].itertuples():
            rows = table[(table.analysis == "rows") & (table.variant == r.variant) & (table.N == r.N)]
            if rows.bounded_k90.mean() > 0.5:
                state, verdict = "inconclusive", "row k90 is bounded by the sample count at some lengths"
            elif r.alpha_high < 1:
                state, verdict = "supported", f"k90/d falls as n grows: k90 grows as n^{r.alpha:.2f}"
            elif r.alpha_low >= 1:
                state, verdict = "not supported", f"k90 grows at least as fast as n (n^{r.alpha:.2f})"
            else:
                state, verdict = "inconclusive", "the interval for α includes 1: k90/d may not fall with n"
            out.append(_row("C1", fp, model=r.model, view=r.view, variant=r.variant,
                            scope=f"rows against n = {r.n_min}…{r.n_max} ({int(r.heads)} heads, N={r.N})",
                            quantity="α of median k90 ≈ c·n^α", value=float(r.alpha),
                            spread=f"95% {r.alpha_low:.2f}–{r.alpha_high:.2f} (bootstrap over heads); k90/d "
                                   f"{r.median_k_share_first:.2f} at n={r.n_min}, {r.median_k_share_last:.2f} at "
                                   f"n={r.n_max}",
                            state=state, verdict=verdict, caveat=_caveat_rows(r.variant, r.view)))
        k90 = sat[sat.level == "k90"]
        full = table[table.analysis == "full"]
        for (model, view, variant), g in k90.groupby(["model", "view", "variant"], sort=False):
            share = float(g.saturated.mean())
            med = float(g.k_last.median())
            Nl = int(g.N_last.iloc[0])
            f = full[(full.variant == variant) & (full.N == Nl)]
            if share > 0.5:
                state, verdict = "supported", f"full-matrix k90 saturates at {med:.0f} of {int(f.d.iloc[0])} by N = {Nl}"
            else:
                state, verdict = "inconclusive", (f"full-matrix k90 is still growing or bounded at N = {Nl} "
                                                  f"(k90 ≥ {med:.0f}); more sequences are needed")
            out.append(_row("C1", sp, model=model, view=view, variant=variant,
                            scope=f"full matrices against N = …{int(g.N_prev.iloc[0])}, {Nl} (n={int(g.n.iloc[0])})",
                            quantity=f"median k90 at N = {Nl}", value=med,
                            spread=f"{share:.0%} of heads saturated; {float(g.bounded.mean()):.0%} bounded by N",
                            state=state, verdict=verdict, caveat=""))
    return out


# --------------------------------------------------------------------------------------------- C2


def _pick(values, want: int) -> int:
    """``want`` if measured, else the largest measured value below it (else the smallest)."""
    values = sorted(set(int(x) for x in values))
    below = [x for x in values if x <= want]
    return below[-1] if below else values[0]


def c2_rows(overlap_summary, cfg: dict) -> list[dict]:
    """Overlap and captured share across layers and across models, for both row variants."""
    s = pd.read_csv(overlap_summary)
    k = _pick(s.k, cfg["k_report"])
    s = s[s.k == k]
    out = []
    ceilings = s[s.scope == "split_half"].set_index(["model_a", "view", "variant", "quantity"])
    for r in s[s.scope.isin(["all_layer_pairs", "cross_model"])].itertuples():
        cross = r.scope == "cross_model"
        pair = f"{r.model_a}×{r.model_b}" if cross else r.model_a
        ceil_ratio = [float(ceilings.loc[(m, r.view, r.variant, r.quantity)].median_ratio_random)
                      for m in {r.model_a, r.model_b}]
        what = "overlap_k" if r.quantity == "overlap" else "captured_k (share of b's variance in a's subspace)"
        caveats = [_caveat_rows(r.variant, r.view, r.u1_constant_median)]
        if cross:
            caveats.append(CAVEAT_CROSS)
        if min(ceil_ratio) < cfg["c2_min_ratio_random"]:
            state = "inconclusive"
            verdict = (f"the split-half ceiling is only ×{min(ceil_ratio):.1f} random: the subspaces are not "
                       "estimated reliably")
        elif r.median_ratio_random >= cfg["c2_min_ratio_random"]:
            state, verdict = "supported", f"shared subspace: ≥ {cfg['c2_min_ratio_random']:g}× random"
        else:
            state, verdict = "not supported", f"near random: < {cfg['c2_min_ratio_random']:g}× random"
        out.append(_row("C2", overlap_summary, model=pair, view=r.view, variant=r.variant, k=k,
                        scope=f"{'across models' if cross else 'across layers'} ({r.n_pairs} pairs)",
                        quantity=f"median {what} (random {r.random:.3f})", value=float(r.median),
                        spread=f"p10–p90 {r.p10:.2f}–{r.p90:.2f}; ×{r.median_ratio_random:.1f} random; "
                               f"half-sample pairs at {r.median_ratio_ceiling:.2f} of the split-half ceiling",
                        state=state, verdict=verdict, caveat="; ".join(c for c in caveats if c),
                        method=r.quantity))
    return out


# --------------------------------------------------------------------------------------------- C3


def select_on_fit(df: pd.DataFrame, estimators) -> tuple[str, str]:
    """The (estimator, strategy) with the lowest median TV over heads on the fit split."""
    fit = df[(df.split == "fit") & df.estimator.isin(estimators)]
    if not len(fit):
        raise ValueError("no fit-split rows to select a method on (the reconstruction stage writes them)")
    med = fit.groupby(["estimator", "strategy"]).tv.median()
    return med.idxmin()


def paired_gain(best: pd.DataFrame, base: pd.DataFrame) -> tuple[float, float, float]:
    """(median relative TV reduction over heads, share of heads improved, one-sided Wilcoxon p)."""
    j = best.set_index(["layer", "head"]).tv.to_frame("best").join(base.set_index(["layer", "head"]).tv.rename("base"),
                                                                 how="inner")
    diff = (j.base - j.best).to_numpy()
    rel = diff / np.where(j.base > 0, j.base, np.nan)
    p = float(sps.wilcoxon(diff, alternative="greater").pvalue) if np.any(diff != 0) else 1.0
    return float(np.nanmedian(rel)), float(np.mean(diff > 0)), p


def c3_rows(recon, plugin, cfg: dict) -> list[dict]:
    """Best method (chosen on the fit split) against subset_only and mean, on held-out rows and in
    the plug-in evaluation."""
    out = []
    chosen = {}
    for p in recon:
        df = pd.read_csv(p)
        df = df[df.basis_source == "same"]
        sz = _pick(df.subset_size, cfg["s_report"])
        df = df[df.subset_size == sz]
        ests = [e for e in df.estimator.unique() if e not in BASELINES]
        if not ests:
            continue
        model, view = df.model.iloc[0], df.view.iloc[0]
        be, bs = select_on_fit(df, ests)
        chosen[(model, view, sz)] = (be, bs)
        held = df[df.split == "heldout"]
        best = held[(held.estimator == be) & (held.strategy == bs)]
        q25, q50, q75 = iqr(best.tv)
        for base_est in BASELINES:
            if base_est not in set(df.estimator):
                continue
            bst = select_on_fit(df, [base_est])[1]
            base = held[(held.estimator == base_est) & (held.strategy == bst)]
            gain, improved, pval = paired_gain(best, base)
            ok = pval < cfg["c3_alpha"] and gain >= cfg["c3_min_gain"]
            out.append(_row("C3", p, model=model, view=view, s=sz, method=f"{be}/{bs}",
                            scope=f"held-out rows, vs {base_est} ({base_est}/{bst})",
                            quantity="median TV over heads (method chosen on the fit split)", value=q50,
                            spread=f"IQR {q25:.3f}–{q75:.3f}; {base_est} {base.tv.median():.3f}; median gain "
                                   f"{gain:.0%}, {improved:.0%} of heads better, Wilcoxon p={pval:.1g}",
                            state="supported" if ok else "not supported",
                            verdict=(f"computing s keys adds to {base_est}" if ok else
                                     f"no clear gain over {base_est} (needs p < {cfg['c3_alpha']:g} and a median "
                                     f"gain ≥ {cfg['c3_min_gain']:.0%})"),
                            caveat=f"s = {sz} of the view's keys computed per row"))
    for p in plugin:
        pl = pd.read_csv(p)
        sz = _pick(pl.subset_size, cfg["s_report"])
        x = pl[pl.subset_size == sz]
        model, metric = x.model.iloc[0], x.metric.iloc[0]
        pick = [key for key in chosen if key[0] == model and key[2] == sz]
        cands = x[~x.estimator.isin(BASELINES)]
        if pick:
            be, bs = chosen[pick[0]]
            sel = cands[(cands.estimator == be) & (cands.strategy == bs)]
            cands = sel if len(sel) else cands
        # damage relative to exact: excess log-perplexity, or the cosine deficit
        damage = (lambda r: float(np.log(r.ratio))) if metric == "perplexity" else (lambda r: 1.0 - float(r.value))
        for r in cands.itertuples():
            for base_est in BASELINES:
                base = x[(x.estimator == base_est) & (x.strategy == r.strategy)]
                if not len(base):
                    continue
                b = next(base.itertuples())
                gain = 1.0 - damage(r) / damage(b) if damage(b) > 0 else 0.0
                ok = gain >= cfg["c3_min_gain"]
                value = float(r.ratio if metric == "perplexity" else r.value)
                bval = float(b.ratio if metric == "perplexity" else b.value)
                out.append(_row("C3", p, model=model, view="plug-in", s=sz, method=f"{r.estimator}/{r.strategy}",
                                scope=f"plug-in, vs {base_est}",
                                quantity="perplexity / exact" if metric == "perplexity" else "embedding cosine to exact",
                                value=value, spread=f"{base_est} {bval:.3f}; {gain:.0%} of its damage removed",
                                state="supported" if ok else "not supported",
                                verdict=(f"beats {base_est} inside the model" if ok else f"no clear gain over {base_est}"),
                                caveat="one evaluation set, no interval; the method was chosen on the fit split"
                                if pick else "one evaluation set, no interval; no fit-split choice for this view"))
    return out


# --------------------------------------------------------------------------------------------- C4


def c4_rows(training, cfg: dict) -> list[dict]:
    """Per mode: exact against the unigram baseline and its own shuffled-order accuracy (both must be
    beaten for any comparison to speak to C4), then every variant and s against exact."""
    s = pd.read_csv(training)
    out = []
    keep = cfg["c4_min_kept_gain"]
    n = int(s.heldout_tokens.iloc[0])
    u, H = float(s.unigram_acc.iloc[0]), float(s.unigram_entropy.iloc[0])
    for mode, g in s.groupby("mode", sort=False):
        ex = g[g.variant == "exact"]
        m = learned_margins(ex.heldout_mlm_acc, ex.heldout_loss, ex.heldout_loss_sd, n, u, H)
        o = order_gain(ex.heldout_mlm_acc, ex.heldout_mlm_acc_shuffled, n)
        acc = float(ex.heldout_mlm_acc.mean())
        if not m["learned"]:
            blocker = "inconclusive: exact has not learned"
        elif not o["uses_order"]:
            blocker = ("inconclusive: exact ignores word order (a bag-of-words model), so attention variants "
                       "cannot be told apart from it")
        else:
            blocker = None
        out.append(_row("C4", training, mode=mode, model="exact", scope=f"{mode} exact ({len(ex)} seeds) vs unigram",
                        quantity="held-out MLM accuracy", value=acc,
                        spread=f"unigram {u:.3f} (×{acc / u:.2f}); loss {ex.heldout_loss.mean():.2f} vs entropy "
                               f"{H:.2f} nats; shuffled-order accuracy {ex.heldout_mlm_acc_shuffled.mean():.3f}; "
                               f"{n} tokens",
                        state="inconclusive" if blocker else "reference",
                        verdict=blocker or "exact has learned and uses word order", caveat=""))
        gain = m["acc_gap"]
        for (v, size), x in g[g.variant != "exact"].groupby(["variant", "subset_size"], sort=False):
            delta, lo, hi = accuracy_difference(x.heldout_mlm_acc, ex.heldout_mlm_acc, n)
            margin = (1 - keep) * gain
            if blocker:
                state, verdict = "inconclusive", blocker
            elif lo >= -margin:
                state, verdict = "supported", f"keeps ≥ {keep:.0%} of exact's gain over unigram"
            elif hi < -margin:
                state, verdict = "not supported", f"keeps < {keep:.0%} of exact's gain over unigram"
            else:
                state, verdict = "inconclusive", f"interval too wide to tell whether it keeps {keep:.0%}"
            caveats = []
            fr = float(x.flops_ratio.iloc[0])
            if fr >= 1:
                caveats.append(f"attention costs ×{fr:.2f} exact's FLOPs at this s: no saving")
            if mode == "finetune" and x.heldout_mlm_acc_step0.notna().any():
                caveats.append(f"step 0 (attention replaced, no training) {x.heldout_mlm_acc_step0.mean():.3f}")
            kept = f"kept {(gain + delta) / gain:.0%} of exact's gain" if gain > 0 else "exact has no gain to keep"
            out.append(_row("C4", training, mode=mode, model=v, s=int(size), scope=f"{mode} {v} s={size}",
                            quantity="held-out MLM accuracy", value=float(x.heldout_mlm_acc.mean()),
                            spread=f"Δ vs exact {delta:+.3f} (95% {lo:+.3f}…{hi:+.3f}); {kept}",
                            state=state, verdict=verdict, caveat="; ".join(caveats)))
    return out


def claims_table(spectra, overlap_summary, recon, plugin, training, cfg: dict | None = None,
                 scaling: tuple = ((), (), ())) -> pd.DataFrame:
    """``scaling``: (fits, saturations, tables) of the scaling study, one of each per model and view."""
    cfg = {**DEFAULTS, **(cfg or {})}
    rows = (c1_rows(spectra, cfg) + c1_scaling_rows(*scaling) + c2_rows(overlap_summary, cfg)
            + c3_rows(recon, plugin, cfg) + c4_rows(training, cfg))
    df = pd.DataFrame.from_records(rows, columns=COLUMNS)
    for col in ("k", "s"):
        df[col] = df[col].astype("Int64")
    df["source"] = [str(Path(p)) for p in df.source]
    return df
