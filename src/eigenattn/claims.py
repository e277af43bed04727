"""The claims table of METHOD.md §9, computed from the pipeline's CSV outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .figures import iqr

COLUMNS = ["claim", "scope", "quantity", "value", "spread", "verdict", "source"]


def c1_rows(spectra) -> list[dict]:
    out = []
    for p in spectra:
        sp = pd.read_csv(p)
        r = sp[(sp.analysis == "rows") & (sp["head"] != "pooled")]
        for v in ("raw", "row_centered"):
            x = r[r.variant == v]
            if not len(x):
                continue
            q25, q50, q75 = iqr(x.k90 / x.d)
            model, view, d = x.model.iloc[0], x.view.iloc[0], int(x.d.iloc[0])
            out.append({"claim": "C1", "scope": f"{model}/{view} rows {v} (d={d}, {len(x)} heads)",
                        "quantity": "median k90/d over heads", "value": q50, "spread": f"IQR {q25:.2f}–{q75:.2f}",
                        "verdict": "low-dimensional: k90 < d/2" if q50 < 0.5 else "not low-dimensional: k90 ≥ d/2",
                        "source": str(p)})
    return out


def c2_rows(overlap_summary, k: int | None = None) -> list[dict]:
    s = pd.read_csv(overlap_summary)
    s = s[s.variant == "raw"]
    k = k if k is not None and k in set(s.k) else int(sorted(set(s.k))[len(set(s.k)) // 2])
    out = []
    for r in s[(s.k == k) & (s.scope != "split_half")].itertuples():
        pair = r.model_a if r.model_a == r.model_b else f"{r.model_a}×{r.model_b}"
        out.append({"claim": "C2", "scope": f"{pair}/{r.view} {r.scope} ({r.n_pairs} pairs)",
                    "quantity": f"median overlap_k, k={k} (random {r.median / r.median_ratio_random:.3f})",
                    "value": float(r.median),
                    "spread": f"p10–p90 {r.p10:.2f}–{r.p90:.2f}; ×{r.median_ratio_random:.1f} random",
                    "verdict": "shared subspace: ≥ 2× random" if r.median_ratio_random >= 2 else "near random",
                    "source": str(overlap_summary)})
    return out


def pick_size(sizes, s: int) -> int:
    """s if it was measured, else the largest measured size below it (else the smallest)."""
    sizes = sorted(set(int(x) for x in sizes))
    below = [x for x in sizes if x <= s]
    return below[-1] if below else sizes[0]


def c3_rows(recon, plugin, s_report: int) -> list[dict]:
    out = []
    for p in recon:
        df = pd.read_csv(p)
        sz = pick_size(df.subset_size, s_report)
        same = df[(df.basis_source == "same") & (df.subset_size == sz)]
        if not len(same):
            continue
        med = same.groupby(["estimator", "strategy"]).tv.median()
        est = med.drop(index="subset_only", level=0, errors="ignore")
        (be, bs), tv = est.idxmin(), float(est.min())
        so = med.loc["subset_only"].min() if "subset_only" in med.index.get_level_values(0) else np.nan
        x = same[(same.estimator == be) & (same.strategy == bs)]
        q25, _, q75 = iqr(x.tv)
        model, view = df.model.iloc[0], df.view.iloc[0]
        out.append({"claim": "C3", "scope": f"{model}/{view} s={sz} ({be}, {bs})",
                    "quantity": "median TV over heads (best estimator)", "value": tv,
                    "spread": f"IQR {q25:.3f}–{q75:.3f}; subset_only {so:.3f}",
                    "verdict": "reconstruction beats subset_only" if tv < so else "subset_only is as good or better",
                    "source": str(p)})
    for p in plugin:
        pl = pd.read_csv(p)
        sz = pick_size(pl.subset_size, s_report)
        x = pl[pl.subset_size == sz]
        if not len(x):
            continue
        metric = x.metric.iloc[0]
        est = x[x.estimator != "subset_only"]
        best = est.loc[est.ratio.idxmin()] if metric == "perplexity" else est.loc[est.value.idxmax()]
        so = x[x.estimator == "subset_only"]
        so_v = float(so.ratio.min() if metric == "perplexity" else so.value.max()) if len(so) else np.nan
        value = float(best.ratio if metric == "perplexity" else best.value)
        better = value < so_v if metric == "perplexity" else value > so_v
        out.append({"claim": "C3", "scope": f"{best.model} plug-in s={sz} ({best.estimator}, {best.strategy})",
                    "quantity": "perplexity / exact" if metric == "perplexity" else "embedding cosine to exact",
                    "value": value, "spread": f"subset_only {so_v:.3f}",
                    "verdict": "reconstruction beats subset_only" if better else "subset_only is as good or better",
                    "source": str(p)})
    return out


def c4_rows(training) -> list[dict]:
    s = pd.read_csv(training)
    out = []
    for mode, g in s.groupby("mode", sort=False):
        ex = g[g.variant == "exact"].heldout_mlm_acc
        spread = float(g.noise.iloc[0]) if "noise" in g else float(ex.max() - ex.min())
        out.append({"claim": "C4", "scope": f"{mode} exact ({len(ex)} seeds)", "quantity": "held-out MLM accuracy",
                    "value": float(ex.mean()), "spread": f"seed range {ex.min():.3f}–{ex.max():.3f}",
                    "verdict": "reference", "source": str(training)})
        for (v, size), x in g[g.variant != "exact"].groupby(["variant", "subset_size"], sort=False):
            acc = float(x.heldout_mlm_acc.mean())
            delta = acc - float(ex.mean())
            if abs(delta) <= spread:
                verdict = "within exact noise"
            else:
                verdict = "below exact (beyond noise)" if delta < 0 else "above exact (beyond noise)"
            out.append({"claim": "C4", "scope": f"{mode} {v} s={size}", "quantity": "held-out MLM accuracy",
                        "value": acc, "spread": f"Δ vs exact {delta:+.3f} (noise ±{spread:.3f})", "verdict": verdict,
                        "source": str(training)})
    return out


def claims_table(spectra, overlap_summary, recon, plugin, training, s_report: int = 16, k: int | None = 16):
    rows = c1_rows(spectra) + c2_rows(overlap_summary, k) + c3_rows(recon, plugin, s_report) + c4_rows(training)
    return pd.DataFrame.from_records(rows, columns=COLUMNS)
