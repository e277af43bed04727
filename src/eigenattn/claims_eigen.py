"""C1 and C2 of the claims table: how low-dimensional score rows and view blocks are (from the
spectra and the scaling study), and how much heads share their subspaces (from the overlap summary)."""

from __future__ import annotations

import pandas as pd

from .figures import iqr
from .verdicts import CAVEAT_CROSS, caveat_rows, make_row, nearest_measured

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
                        caveat=caveat_rows(v, view, float(x.u1_constant.median()) if analysis == "rows" else None))
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
            out.append(make_row("C1", **base, **row, state=state, verdict=verdict))
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
            out.append(make_row("C1", fp, model=r.model, view=r.view, variant=r.variant,
                                scope=f"rows against n = {r.n_min}…{r.n_max} ({int(r.heads)} heads, N={r.N})",
                                quantity="α of median k90 ≈ c·n^α", value=float(r.alpha),
                                spread=f"95% {r.alpha_low:.2f}–{r.alpha_high:.2f} (bootstrap over heads); k90/d "
                                       f"{r.median_k_share_first:.2f} at n={r.n_min}, {r.median_k_share_last:.2f} at "
                                       f"n={r.n_max}",
                                state=state, verdict=verdict, caveat=caveat_rows(r.variant, r.view)))
        k90 = sat[sat.level == "k90"]
        full = table[table.analysis == "full"]
        for (model, view, variant), g in k90.groupby(["model", "view", "variant"], sort=False):
            share = float(g.saturated.mean())
            med = float(g.k_last.median())
            Nl = int(g.N_last.iloc[0])
            f = full[(full.variant == variant) & (full.N == Nl)]
            if share > 0.5:
                state = "supported"
                verdict = f"full-matrix k90 saturates at {med:.0f} of {int(f.d.iloc[0])} by N = {Nl}"
            else:
                bounded = float(g.bounded.mean()) > 0.5
                state, verdict = "inconclusive", (
                    f"full-matrix k90 is bounded by N at N = {Nl} (k90 ≥ {med:.0f}); more sequences are needed"
                    if bounded else f"full-matrix k90 is measured but still growing at N = {Nl} "
                    f"({float(g.k_prev.median()):.0f} → {med:.0f}); more sequences are needed")
            out.append(make_row("C1", sp, model=model, view=view, variant=variant,
                                scope=f"full matrices against N = …{int(g.N_prev.iloc[0])}, {Nl} "
                                      f"(n={int(g.n.iloc[0])})",
                                quantity=f"median k90 at N = {Nl}", value=med,
                                spread=f"{share:.0%} of heads saturated; {float(g.bounded.mean()):.0%} bounded by N",
                                state=state, verdict=verdict, caveat=""))
    return out


# --------------------------------------------------------------------------------------------- C2


def c2_rows(overlap_summary, cfg: dict) -> list[dict]:
    """Overlap and captured share across layers and across models, for both row variants."""
    s = pd.read_csv(overlap_summary)
    k = nearest_measured(s.k, cfg["k_report"])
    s = s[s.k == k]
    out = []
    ceilings = s[s.scope == "split_half"].set_index(["model_a", "view", "variant", "quantity"])
    for r in s[s.scope.isin(["all_layer_pairs", "cross_model"])].itertuples():
        cross = r.scope == "cross_model"
        pair = f"{r.model_a}×{r.model_b}" if cross else r.model_a
        ceil_ratio = [float(ceilings.loc[(m, r.view, r.variant, r.quantity)].median_ratio_random)
                      for m in {r.model_a, r.model_b}]
        what = "overlap_k" if r.quantity == "overlap" else "captured_k (share of b's variance in a's subspace)"
        caveats = [caveat_rows(r.variant, r.view, r.u1_constant_median)]
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
        out.append(make_row("C2", overlap_summary, model=pair, view=r.view, variant=r.variant, k=k,
                            scope=f"{'across models' if cross else 'across layers'} ({r.n_pairs} pairs)",
                            quantity=f"median {what} (random {r.random:.3f})", value=float(r.median),
                            spread=f"p10–p90 {r.p10:.2f}–{r.p90:.2f}; ×{r.median_ratio_random:.1f} random; "
                                   f"half-sample pairs at {r.median_ratio_ceiling:.2f} of the split-half ceiling",
                            state=state, verdict=verdict, caveat="; ".join(c for c in caveats if c),
                            method=r.quantity))
    return out
