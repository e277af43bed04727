"""summary.csv of the training stage: every run compared with exact and the unigram baseline
(docs/method.md §8)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from eigenattn.config.schema import enum
from eigenattn.errors import ConfigError, InputError
from eigenattn.training.stats import accuracy_difference, learned_margins, order_gain

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
    "params",
    "attention_flops_per_seq",
    "flops_ratio",
    "mean_step_time_ms",
    "unigram_entropy",
    "unigram_acc",
    "exact_mean_acc",
    "exact_seed_sd",
    "exact_acc_gap",
    "exact_acc_gap_low",
    "exact_loss_gap",
    "exact_loss_gap_low",
    "exact_learned",
    "heldout_mlm_acc_shuffled",
    "exact_order_gain",
    "exact_order_gain_low",
    "exact_uses_order",
    "delta_vs_exact",
    "delta_ci_low",
    "delta_ci_high",
    "kept_gain",
    "kept_gain_ci_low",
    "kept_gain_ci_high",
    "tokenizer_sha256",
]


def summarise(final_paths) -> "pd.DataFrame":
    """summary.csv: one row per run, each compared with ``exact`` of its mode.

    - ``exact_learned``: exact's accuracy beats the unigram baseline's, and its loss the unigram
      entropy, by more than their 95% intervals (:func:`eigenattn.training.stats.learned_margins`); unless
      it does, no comparison with exact can speak to C4.
    - ``exact_uses_order``: exact scores better on the held-out windows than on the same windows with
      their tokens shuffled, beyond the 95% interval (:func:`eigenattn.training.stats.order_gain`); a model
      that ignores word order is a bag-of-words predictor, against which no attention variant can
      be told apart.
    - ``delta_vs_exact`` with its 95% interval (:func:`eigenattn.training.stats.accuracy_difference`).
    - ``kept_gain``: the share of exact's gain over the unigram baseline that the run keeps,
      ``(acc − unigram_acc) / (exact_mean_acc − unigram_acc)``, with the interval of the difference.
    """
    df = pd.DataFrame([json.loads(Path(p).read_text()) for p in final_paths])
    if "heldout_mlm_acc_step0" not in df:
        df["heldout_mlm_acc_step0"] = np.nan
    for key in ("unigram_entropy", "unigram_acc", "heldout_tokens", "tokenizer_sha256"):
        if df[key].nunique() != 1:
            raise InputError(
                f"{len(final_paths)} training final.json files",
                f"training runs were scored on different held-out data ({key} differs: {sorted(df[key].unique())})",
                "re-run the training stage",
            )
    n_tokens = int(df.heldout_tokens.iloc[0])
    u = float(df.unigram_acc.iloc[0])
    for col in SUMMARY_COLUMNS:
        if col not in df:
            df[col] = np.nan
    df["exact_learned"] = False
    df["exact_uses_order"] = False
    for mode, g in df.groupby("mode"):
        ex = g[g.variant == "exact"]
        if len(ex) < 2:
            raise ConfigError(
                "training.exact_seeds",
                f"mode '{mode}': {len(ex)} exact run(s); seed noise needs at least two exact seeds",
                "list two or more seeds in training.exact_seeds",
            )
        m = learned_margins(
            ex.heldout_mlm_acc, ex.heldout_loss, ex.heldout_loss_sd, n_tokens, u, float(ex.unigram_entropy.iloc[0])
        )
        gain = m["acc_gap"]
        df.loc[g.index, ["exact_mean_acc", "exact_seed_sd"]] = [ex.heldout_mlm_acc.mean(), ex.heldout_mlm_acc.std()]
        df.loc[g.index, ["exact_acc_gap", "exact_acc_gap_low", "exact_loss_gap", "exact_loss_gap_low"]] = [
            m["acc_gap"],
            m["acc_gap_low"],
            m["loss_gap"],
            m["loss_gap_low"],
        ]
        df.loc[g.index, "exact_learned"] = m["learned"]
        o = order_gain(ex.heldout_mlm_acc, ex.heldout_mlm_acc_shuffled, n_tokens)
        df.loc[g.index, ["exact_order_gain", "exact_order_gain_low"]] = [o["gain"], o["gain_low"]]
        df.loc[g.index, "exact_uses_order"] = o["uses_order"]
        df.loc[g.index, "flops_ratio"] = g.attention_flops_per_seq / ex.attention_flops_per_seq.iloc[0]
        for i, r in g.iterrows():
            delta, lo, hi = accuracy_difference([r.heldout_mlm_acc], ex.heldout_mlm_acc, n_tokens)
            df.loc[i, ["delta_vs_exact", "delta_ci_low", "delta_ci_high"]] = [delta, lo, hi]
            if gain > 0:
                df.loc[i, ["kept_gain", "kept_gain_ci_low", "kept_gain_ci_high"]] = [
                    (gain + delta) / gain,
                    (gain + lo) / gain,
                    (gain + hi) / gain,
                ]
    order = {v: i for i, v in enumerate(("exact", *enum("training.variants")))}
    df = df.sort_values(
        ["mode", "variant", "subset_size", "seed"],
        key=lambda c: (
            c.map(order) if c.name == "variant" else (c.map({"scratch": 0, "finetune": 1}) if c.name == "mode" else c)
        ),
    )
    return df[SUMMARY_COLUMNS].reset_index(drop=True)
