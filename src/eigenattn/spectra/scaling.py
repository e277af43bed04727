"""The scaling study (docs/method.md §10): how k_p grows with the sequence length n (score rows)
and with the number of sequences N (whole view blocks).

- Rows: per head, ``k90 ≈ c · n^α`` by least squares on log k90 against log n; the fit of the
  medians (median k90 over heads at each n), with an interval whose independent unit is the layer
  (:func:`alpha_interval`): heads of one layer are not independent draws. ``α < 1`` means the
  share of dimensions needed, k90/d, falls as sequences grow (d ∝ n).
- Full matrices: k_p against N. At the largest N, k_p has *saturated* when it is measured (not
  bounded by the sample count) and moved from the previous N by no more than the split-half noise
  (the disagreement between the k_p of the two halves of the sequences, at least 1). Until then
  it is bracketed: the in-sample k_p is low in expectation (the sample covariance's top-k variance
  over-estimates the population's: Ky Fan's sum of the top k eigenvalues is convex, so Jensen's
  inequality applies, while the total variance is unbiased), and the held-out ``k_p_cv`` (one
  half's eigenvectors on the other half's variance) is high; ``k_cv_last`` is inf where the
  held-out EV never reaches p.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from eigenattn.spectra.rows import P_LEVELS

KEYS = ["model", "view", "analysis", "variant", "n", "N", "layer", "head"]


def collect(points) -> pd.DataFrame:
    """One table from the spectrum.csv of every grid point: ``points`` = [(path, n, N)].

    One row per (analysis, variant, n, N, layer, head); the layer-pooled rows are left out.
    """
    parts = []
    for path, n, N in points:
        sp = pd.read_csv(path)
        sp = sp[sp["head"].astype(str) != "pooled"].copy()
        sp.insert(4, "n", int(n))
        sp.insert(5, "N", int(N))
        parts.append(sp)
    df = pd.concat(parts, ignore_index=True)
    df["head"] = df["head"].astype(int)
    return df.sort_values(KEYS[:6]).reset_index(drop=True)


def power_law(n, k) -> tuple[float, float]:
    """(α, c) of k ≈ c · n^α by least squares in log–log space."""
    alpha, logc = np.polyfit(np.log(np.asarray(n, float)), np.log(np.asarray(k, float)), 1)
    return float(alpha), float(np.exp(logc))


def _slopes(logk: np.ndarray, logn: np.ndarray) -> np.ndarray:
    """Least-squares slopes of each row of ``logk`` (..., len(logn)) against ``logn``."""
    x = logn - logn.mean()
    return (logk - logk.mean(axis=-1, keepdims=True)) @ x / (x @ x)


def alpha_interval(K, layers, ns, bootstrap: int, rng, level: float = 0.95) -> tuple[float, float]:
    """Interval for α of the medians' power law, with the **layer** as the independent unit.

    ``K`` (heads, len(ns)): k_p of each head at each n; ``layers`` (heads,): each head's layer.
    Heads of one layer read the same residual stream, and every head sees the same sequences, so
    heads are not independent draws: a bootstrap over heads measures the spread over heads, and
    with heads alike within a layer its interval is far too narrow (73% coverage at 6 layers × 12
    heads in tests/test_intervals.py, against 97% here). Here whole layers are resampled with
    replacement (a cluster bootstrap: every head of a drawn layer comes along), the median k_p per
    n recomputed and the power law refitted. Its standard error, scaled by sqrt(L/(L−1)) (the bootstrap's variance of
    a mean of L clusters is (L−1)/L of the unbiased one), is used with Student's t quantile on
    L − 1 degrees of freedom: α ± t_{L−1} · SE. With one layer there is no interval (NaN, NaN).
    """
    K = np.asarray(K, float)
    labels, groups = np.unique(np.asarray(layers), return_inverse=True)
    L = len(labels)
    if L < 2:
        return np.nan, np.nan
    logn = np.log(np.asarray(ns, float))
    alpha = float(_slopes(np.log(np.median(K, axis=0)), logn))
    members = [np.flatnonzero(groups == j) for j in range(L)]
    pick = rng.integers(0, L, (bootstrap, L))
    med = np.stack([np.median(K[np.concatenate([members[j] for j in row])], axis=0) for row in pick])
    se = float(np.std(_slopes(np.log(med), logn), ddof=1)) * np.sqrt(L / (L - 1))
    half = float(sps.t.ppf(0.5 + level / 2, L - 1)) * se
    return alpha - half, alpha + half


def length_fits(table: pd.DataFrame, N: int, bootstrap: int, seed: int, p: float = 0.90) -> pd.DataFrame:
    """Per head, and for the medians over heads, the power law of k_p against n (rows, at N).

    The medians' fit gets a 95% interval for α with the layer as the independent unit
    (:func:`alpha_interval`: a cluster bootstrap over layers, the same heads at every n, and
    Student's t on layers − 1 degrees of freedom); ``layers`` counts them.
    """
    col = f"k{round(p * 100)}"
    rows = table[(table.analysis == "rows") & (table.N == N)]
    out = []
    for (model, view, variant), g in rows.groupby(["model", "view", "variant"], sort=False):
        wide = g.pivot_table(index=["layer", "head"], columns="n", values=col)
        ns = np.asarray(wide.columns, float)
        if len(ns) < 2:
            continue
        base = {
            "model": model,
            "view": view,
            "variant": variant,
            "level": col,
            "N": N,
            "n_min": int(ns.min()),
            "n_max": int(ns.max()),
            "points": len(ns),
        }
        for (layer, head), k in wide.iterrows():
            a, c = power_law(ns, k.to_numpy())
            out.append({**base, "scope": "head", "layer": layer, "head": head, "alpha": a, "c": c})
        K = wide.to_numpy(float)
        d = g.groupby("n").d.first().reindex(wide.columns).to_numpy(float)  # the view's d at each n
        a, c = power_law(ns, np.median(K, axis=0))
        lo, hi = alpha_interval(K, wide.index.get_level_values("layer"), ns, bootstrap, np.random.default_rng(seed))
        out.append(
            {
                **base,
                "scope": "medians",
                "layer": -1,
                "head": -1,
                "alpha": a,
                "c": c,
                "alpha_low": float(lo),
                "alpha_high": float(hi),
                "heads": len(K),
                "layers": int(wide.index.get_level_values("layer").nunique()),
                "d_first": int(d[0]),
                "d_last": int(d[-1]),
                "median_k_share_first": float(np.median(K[:, 0] / d[0])),
                "median_k_share_last": float(np.median(K[:, -1] / d[-1])),
                "bounded_share_last": float(g[g.n == ns[-1]][f"bounded_{col}"].astype(bool).mean()),
            }
        )
    return pd.DataFrame.from_records(out)


SATURATION_COLUMNS = [
    "model",
    "view",
    "variant",
    "level",
    "n",
    "N_last",
    "N_prev",
    "layer",
    "head",
    "d",
    "k_last",
    "k_prev",
    "k_cv_last",
    "noise",
    "bounded",
    "saturated",
]


def sample_saturation(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """Per head and level, full-matrix k_p at the largest N against the previous N (at length n);
    no rows (but the columns) for a model without a sample sweep."""
    full = table[(table.analysis == "full") & (table.n == n)]
    out = []
    for (model, view, variant), g in full.groupby(["model", "view", "variant"], sort=False):
        Ns = sorted(g.N.unique())
        if len(Ns) < 2:
            continue
        last, prev = g[g.N == Ns[-1]].set_index(["layer", "head"]), g[g.N == Ns[-2]].set_index(["layer", "head"])
        for p in P_LEVELS:
            col = f"k{round(p * 100)}"
            bounded = last[f"bounded_{col}"].astype(bool)
            noise = np.maximum(last[f"{col}_split_spread"].astype(float), 1.0)
            step = (last[col] - prev[col]).abs()
            for (layer, head), r in last.iterrows():
                out.append(
                    {
                        "model": model,
                        "view": view,
                        "variant": variant,
                        "level": col,
                        "n": n,
                        "N_last": Ns[-1],
                        "N_prev": Ns[-2],
                        "layer": layer,
                        "head": head,
                        "d": int(r["d"]),
                        "k_last": int(r[col]),
                        "k_cv_last": float(r[f"{col}_cv"]) if pd.notna(r[f"{col}_cv"]) else np.inf,
                        "k_prev": int(prev.loc[(layer, head), col]),
                        "noise": float(noise[(layer, head)]),
                        "bounded": bool(bounded[(layer, head)]),
                        "saturated": bool(not bounded[(layer, head)] and step[(layer, head)] <= noise[(layer, head)]),
                    }
                )
    return pd.DataFrame.from_records(out, columns=SATURATION_COLUMNS)
