"""The training stage's tables (docs/method.md §8, docs/data-contract.md):

- ``summary.csv``: one row per run, its own figures;
- ``comparisons.csv``: one row per mode × variant × s, every comparison C4 is judged on. Runs of a
  seed are paired (same initialisation where the shapes allow, same batch order and masks) and
  every run is scored on the same held-out tokens, so each comparison is a seeds × tokens contrast
  with the interval of :func:`eigenattn.training.stats.crossed_interval`.

What each comparison asks:

- ``exact_learned``: exact beats the unigram baseline in accuracy (most frequent fit token, on the
  same tokens) and in loss (the fit split's unigram entropy), beyond the 95% intervals;
- ``exact_uses_order``: exact scores better on the held-out windows than on the same windows with
  their tokens shuffled, beyond the interval, in the mean and in every seed;
- ``exact_beats_floor``: exact beats the uniform floor (order-free attention) beyond the interval:
  otherwise attention has no gain for a variant to keep;
- per variant: ``delta_vs_exact`` and ``delta_vs_floor`` with their intervals, and the keep contrast
  ``acc_v − keep·acc_exact − (1 − keep)·acc_floor``, whose interval decides whether the variant
  keeps at least ``keep`` of exact's gain over the floor (the floor's own noise included).

**The token part resamples documents** (docs/method.md §9): held-out windows of one document share
its topic and names, so their tokens are not independent draws. Where the runs' per-token records
name each token's document (``document`` in ``heldout_tokens.npz``, from the windows file's
``heldout_documents``), every seeds × tokens contrast is collapsed to seeds × documents by
:func:`by_document` before :func:`eigenattn.training.stats.crossed_interval`: the token part of
the variance is then that of the documents (J − 1 degrees of freedom), and the estimate is
unchanged. Older records without documents keep tokens as the unit, and ``heldout_documents`` is
empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from eigenattn.config.schema import enum
from eigenattn.errors import InputError
from eigenattn.training.stats import LEVEL, crossed_interval

TOKENS_FILE = "heldout_tokens.npz"  # beside each run's final.json (written by training.loop)

SUMMARY_COLUMNS = [
    "mode",
    "variant",
    "subset_size",
    "seed",
    "steps",
    "heldout_mlm_acc",
    "heldout_loss",
    "heldout_loss_sd",
    "heldout_tokens",
    "heldout_mlm_acc_step0",
    "heldout_mlm_acc_shuffled",
    "params",
    "attention_flops_per_seq",
    "flops_ratio",
    "mean_step_time_ms",
    "unigram_entropy",
    "unigram_acc",
    "tokenizer_sha256",
]

COMPARISON_COLUMNS = [
    "mode",
    "variant",
    "subset_size",
    "seeds",
    "acc_mean",
    "acc_seed_sd",
    "acc_step0_mean",
    "acc_shuffled_mean",
    "flops_ratio",
    "mean_step_time_ms",
    "delta_vs_exact",
    "delta_ci_low",
    "delta_ci_high",
    "delta_df",
    "delta_vs_floor",
    "floor_ci_low",
    "floor_ci_high",
    "keep",
    "keep_contrast",
    "keep_ci_low",
    "keep_ci_high",
    "margin",
    "kept_gain_floor",
    "kept_gain_unigram",
    "exact_acc_mean",
    "floor_acc_mean",
    "unigram_acc",
    "unigram_entropy",
    "heldout_tokens",
    "heldout_documents",
    "exact_acc_gap",
    "exact_acc_gap_low",
    "exact_loss_gap",
    "exact_loss_gap_low",
    "exact_learned",
    "exact_order_gain",
    "exact_order_gain_low",
    "exact_run_gain_min",
    "exact_run_gain_low",
    "exact_uses_order",
    "exact_floor_gain",
    "exact_floor_gain_low",
    "exact_beats_floor",
]

ORDER = {v: i for i, v in enumerate(("exact", "uniform", *enum("training.variants")))}


def _sorted(df: pd.DataFrame, keys) -> pd.DataFrame:
    def key(c):
        if c.name == "variant":
            return c.map(ORDER)
        if c.name == "mode":
            return c.map({"scratch": 0, "finetune": 1})
        return c

    return df.sort_values(keys, key=key).reset_index(drop=True)


def load_runs(final_paths) -> tuple[pd.DataFrame, dict]:
    """(one row per run from its final.json, {(mode, variant, s, seed): its heldout_tokens.npz arrays}).

    Every run must have been scored on the same held-out tokens (same tokenizer, same labels in the
    same order), or no comparison is paired.
    """
    rows, tokens = [], {}
    for p in map(Path, final_paths):
        r = json.loads(p.read_text())
        rows.append(r)
        f = p.parent / TOKENS_FILE
        if not f.is_file():
            raise InputError(f, "missing: the run's per-token record is needed for paired comparisons", "re-run it")
        with np.load(f) as z:
            tokens[(r["mode"], r["variant"], int(r["subset_size"]), int(r["seed"]))] = {k: z[k] for k in z.files}
    df = pd.DataFrame(rows)
    for key in ("unigram_entropy", "unigram_acc", "heldout_tokens", "tokenizer_sha256"):
        if df[key].nunique() != 1:
            raise InputError(
                f"{len(rows)} training final.json files",
                f"training runs were scored on different held-out data ({key} differs: {sorted(df[key].unique())})",
                "re-run the training stage",
            )
    labels = next(iter(tokens.values()))["labels"]
    for k, t in tokens.items():
        if not np.array_equal(t["labels"], labels):
            raise InputError(
                "/".join(map(str, k)),
                "its held-out tokens differ from the other runs' (labels in another order or of other tokens)",
                "re-run the training stage with one tokenizer, windows file and seed",
            )
    return df, tokens


def summarise(final_paths) -> pd.DataFrame:
    """summary.csv: the runs' own figures, one row each (``flops_ratio``: attention FLOPs against
    exact's in the same mode)."""
    df, _ = load_runs(final_paths)
    for col in SUMMARY_COLUMNS:
        if col not in df:
            df[col] = np.nan
    for mode, g in df.groupby("mode"):
        ex = g[g.variant == "exact"]
        if len(ex):
            df.loc[g.index, "flops_ratio"] = g.attention_flops_per_seq / ex.attention_flops_per_seq.iloc[0]
    return _sorted(df, ["mode", "variant", "subset_size", "seed"])[SUMMARY_COLUMNS]


def _stack(tokens: dict, mode: str, variant: str, s: int, seeds, field: str = "correct") -> np.ndarray:
    return np.stack([tokens[(mode, variant, s, seed)][field].astype(np.float64) for seed in seeds])


def by_document(X: np.ndarray, documents) -> np.ndarray:
    """Seeds × tokens ``X`` collapsed to seeds × documents (``documents``: each token's; None keeps
    tokens as the unit). Column j is ``(J/n)·T_kj − (J·n_j/n − 1)·m``, with ``T_kj`` the sum of
    seed k's values over document j's ``n_j`` tokens and ``m`` the grand mean: the columns of a seed
    average to that seed's mean over tokens (so every estimate is unchanged), and their spread over
    documents is the cluster-robust (linearised) variance of a mean over clustered tokens."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if documents is None:
        return X
    _, inv = np.unique(np.asarray(documents), return_inverse=True)
    J, n = int(inv.max()) + 1, X.shape[1]
    counts = np.bincount(inv, minlength=J)
    totals = np.stack([np.bincount(inv, weights=row, minlength=J) for row in X])
    return (J / n) * totals - (J * counts / n - 1) * X.mean()


def _documents(tokens: dict):
    """Each held-out token's document, shared by every run, or None (records without documents)."""
    docs = [t.get("document") for t in tokens.values()]
    if any(d is None for d in docs) or any(not np.array_equal(d, docs[0]) for d in docs):
        return None
    return docs[0]


def _exact_checks(tokens, mode, n_len, seeds, top, entropy, docs=None) -> dict:
    """exact against the unigram baseline, its shuffled windows and the uniform floor (``docs``: each
    token's document, the unit of the token part; None: tokens)."""
    E = _stack(tokens, mode, "exact", n_len, seeds)
    labels = next(iter(tokens.values()))["labels"]
    unigram = (labels == top).astype(np.float64)[None, :]
    acc = crossed_interval(by_document(E - unigram, docs))
    loss = crossed_interval(by_document(entropy - _stack(tokens, mode, "exact", n_len, seeds, "loss"), docs))
    Es = _stack(tokens, mode, "exact", n_len, seeds, "correct_shuffled")
    # the shuffled windows are masked at the same positions: their tokens have the same documents
    docs_s = docs if docs is not None and len(docs) == Es.shape[1] else None
    order = crossed_interval(by_document(E, docs), by_document(Es, docs_s), weights=[1, -1])
    # each seed on its own too (token noise only): one order-blind seed among order-using ones is caught
    a, b = E.mean(axis=1), Es.mean(axis=1)
    run_gain = a - b
    if docs_s is not None:  # per seed, Student's t over documents
        D = by_document(E - Es, docs_s)
        J = D.shape[1]
        q = float(sps.t.ppf(0.5 + LEVEL / 2, J - 1)) if J > 1 else np.inf
        run_low = run_gain - q * D.std(axis=1, ddof=1) / np.sqrt(J)
    else:
        z = float(sps.norm.ppf(0.5 + LEVEL / 2))
        run_low = run_gain - z * np.sqrt((a * (1 - a) + b * (1 - b)) / E.shape[1])
    floor = crossed_interval(by_document(E - _stack(tokens, mode, "uniform", n_len, seeds), docs))
    return {
        "exact_acc_gap": acc.estimate,
        "exact_acc_gap_low": acc.low,
        "exact_loss_gap": loss.estimate,
        "exact_loss_gap_low": loss.low,
        "exact_learned": bool(acc.low > 0 and loss.low > 0),
        "exact_order_gain": order.estimate,
        "exact_order_gain_low": order.low,
        "exact_run_gain_min": float(run_gain.min()),
        "exact_run_gain_low": float(run_low.min()),
        "exact_uses_order": bool(order.low > 0 and run_low.min() > 0),
        "exact_floor_gain": floor.estimate,
        "exact_floor_gain_low": floor.low,
        "exact_beats_floor": bool(floor.low > 0),
    }


def compare(final_paths, keep: float) -> pd.DataFrame:
    """comparisons.csv: one row per mode × variant × s (exact and uniform included), each paired with
    exact and the uniform floor of its mode over the seeds they share (see the module docstring).
    ``keep``: the share of exact's gain over the floor a variant must keep (claims.c4_min_kept_gain)."""
    df, tokens = load_runs(final_paths)
    if "heldout_mlm_acc_step0" not in df:
        df["heldout_mlm_acc_step0"] = np.nan
    n_tok, u, H = int(df.heldout_tokens.iloc[0]), float(df.unigram_acc.iloc[0]), float(df.unigram_entropy.iloc[0])
    top = int(df.unigram_top_token.iloc[0])
    docs = _documents(tokens)
    n_docs = len(np.unique(docs)) if docs is not None else np.nan
    out = []
    for mode, g in df.groupby("mode"):
        refs = {v: g[g.variant == v] for v in ("exact", "uniform")}
        for v, r in refs.items():
            if r.seed.nunique() < 2:
                raise InputError(
                    f"training runs of mode '{mode}'",
                    f"{r.seed.nunique()} {v} run(s); seed noise needs at least two seeds",
                    "list two or more seeds in training.seeds",
                )
        n_len = int(refs["exact"].subset_size.iloc[0])
        ref_seeds = sorted(set(refs["exact"].seed) & set(refs["uniform"].seed))
        checks = _exact_checks(tokens, mode, n_len, ref_seeds, top, H, docs)
        acc_e = float(refs["exact"].heldout_mlm_acc.mean())
        acc_f = float(refs["uniform"].heldout_mlm_acc.mean())
        flops_e = float(refs["exact"].attention_flops_per_seq.iloc[0])
        for (v, s), x in g.groupby(["variant", "subset_size"]):
            seeds = sorted(set(x.seed) & set(ref_seeds))
            C = _stack(tokens, mode, v, int(s), seeds)
            E = _stack(tokens, mode, "exact", n_len, seeds)
            F = _stack(tokens, mode, "uniform", n_len, seeds)
            d_e = crossed_interval(by_document(C - E, docs))
            d_f = crossed_interval(by_document(C - F, docs))
            kc = crossed_interval(by_document(C - keep * E - (1 - keep) * F, docs))
            acc = float(x.heldout_mlm_acc.mean())
            out.append(
                {
                    "mode": mode,
                    "variant": v,
                    "subset_size": int(s),
                    "seeds": len(seeds),
                    "acc_mean": acc,
                    "acc_seed_sd": float(x.heldout_mlm_acc.std()) if len(x) > 1 else np.nan,
                    "acc_step0_mean": float(x.heldout_mlm_acc_step0.mean()),
                    "acc_shuffled_mean": float(x.heldout_mlm_acc_shuffled.mean()),
                    "flops_ratio": float(x.attention_flops_per_seq.iloc[0]) / flops_e,
                    "mean_step_time_ms": float(x.mean_step_time_ms.mean()),
                    "delta_vs_exact": d_e.estimate,
                    "delta_ci_low": d_e.low,
                    "delta_ci_high": d_e.high,
                    "delta_df": d_e.df,
                    "delta_vs_floor": d_f.estimate,
                    "floor_ci_low": d_f.low,
                    "floor_ci_high": d_f.high,
                    "keep": keep,
                    "keep_contrast": kc.estimate,
                    "keep_ci_low": kc.low,
                    "keep_ci_high": kc.high,
                    "margin": (1 - keep) * (acc_e - acc_f),
                    "kept_gain_floor": (acc - acc_f) / (acc_e - acc_f) if acc_e != acc_f else np.nan,
                    "kept_gain_unigram": (acc - u) / (acc_e - u) if acc_e != u else np.nan,
                    "exact_acc_mean": acc_e,
                    "floor_acc_mean": acc_f,
                    "unigram_acc": u,
                    "unigram_entropy": H,
                    "heldout_tokens": n_tok,
                    "heldout_documents": n_docs,
                    **checks,
                }
            )
    return _sorted(pd.DataFrame(out), ["mode", "variant", "subset_size"])[COMPARISON_COLUMNS]
