"""Intervals for comparing training runs (docs/method.md §8): accuracies measured on the same
held-out tokens by models trained with several seeds.

Two sources of noise are combined, treating them as independent (which is conservative: every
run is scored on the same tokens, so part of the evaluation noise cancels in a difference):

- seed noise: the variance of accuracy (or loss) across the exact model's seeds, ``s²``
  (sample variance, ``ddof = 1``), assumed to hold for every variant;
- evaluation noise: the binomial variance ``p(1 − p)/n`` of an accuracy over ``n`` held-out
  tokens (for a loss, the per-token variance over ``n``). It does not shrink with more seeds,
  since every seed is scored on the same tokens.

The mean of ``K`` seeds then has variance ``s²/K + p(1 − p)/n``, and a 95% interval is the
estimate ± 1.96 standard errors.
"""

from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054


def seed_variance(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.var(ddof=1)) if v.size > 1 else 0.0


def mean_accuracy_variance(acc, n_tokens: int, seed_var: float) -> float:
    """Variance of the mean accuracy of ``len(acc)`` seeds scored on ``n_tokens`` tokens."""
    acc = np.asarray(acc, dtype=np.float64)
    p = float(acc.mean())
    return seed_var / acc.size + p * (1.0 - p) / n_tokens


def accuracy_difference(acc_variant, acc_exact, n_tokens: int, z: float = Z95) -> tuple[float, float, float]:
    """(difference, low, high): mean accuracy of a variant's seeds minus exact's, with its interval.

    The seed variance is exact's (a variant usually has one seed, so it has none of its own).
    """
    s2 = seed_variance(acc_exact)
    delta = float(np.mean(acc_variant) - np.mean(acc_exact))
    se = np.sqrt(mean_accuracy_variance(acc_variant, n_tokens, s2) + mean_accuracy_variance(acc_exact, n_tokens, s2))
    return delta, delta - z * se, delta + z * se


def learned_margins(
    acc_exact, loss_exact, loss_token_sd, n_tokens: int, unigram_acc: float, unigram_entropy: float, z: float = Z95
) -> dict:
    """How far exact's accuracy and loss beat the unigram baseline, with the lower ends of their
    95% intervals. ``loss_token_sd``: per-token standard deviation of exact's held-out loss (per seed).

    The baseline accuracy is measured on the same tokens, and adds its own binomial variance; the
    unigram entropy comes from the whole fit split and is treated as exact.
    """
    acc_exact = np.asarray(acc_exact, dtype=np.float64)
    loss_exact = np.asarray(loss_exact, dtype=np.float64)
    u = float(unigram_acc)
    acc_gap = float(acc_exact.mean()) - u
    acc_se = np.sqrt(mean_accuracy_variance(acc_exact, n_tokens, seed_variance(acc_exact)) + u * (1 - u) / n_tokens)
    loss_gap = float(unigram_entropy) - float(loss_exact.mean())
    tok_var = float(np.mean(np.square(loss_token_sd)))
    loss_se = np.sqrt(seed_variance(loss_exact) / loss_exact.size + tok_var / n_tokens)
    return {
        "acc_gap": acc_gap,
        "acc_gap_low": acc_gap - z * acc_se,
        "loss_gap": loss_gap,
        "loss_gap_low": loss_gap - z * loss_se,
        "learned": bool(acc_gap - z * acc_se > 0 and loss_gap - z * loss_se > 0),
    }


def order_gain(acc, acc_shuffled, n_tokens: int, z: float = Z95) -> dict:
    """How much exact's accuracy drops when each held-out window's tokens are shuffled.

    Both accuracies are means over the same seeds on ``n_tokens`` tokens each; the shuffled windows
    are different tokens at the masked positions, so the two binomial variances add. Each run is
    also tested on its own (``run_gain_low``: the smallest lower end over the runs, binomial noise
    only): exact uses word order only when the mean *and every run* beat the shuffled windows beyond
    their intervals, so one order-blind seed among order-using ones is caught.
    """
    acc, acc_shuffled = np.asarray(acc, dtype=np.float64), np.asarray(acc_shuffled, dtype=np.float64)
    gain = float(acc.mean() - acc_shuffled.mean())
    se = np.sqrt(
        mean_accuracy_variance(acc, n_tokens, seed_variance(acc))
        + mean_accuracy_variance(acc_shuffled, n_tokens, seed_variance(acc_shuffled))
    )
    run_se = np.sqrt((acc * (1 - acc) + acc_shuffled * (1 - acc_shuffled)) / n_tokens)
    run_gain = acc - acc_shuffled
    run_low = float(np.min(run_gain - z * run_se))
    return {
        "gain": gain,
        "gain_low": gain - z * se,
        "run_gain_min": float(run_gain.min()),
        "run_gain_low": run_low,
        "uses_order": bool(gain - z * se > 0 and run_low > 0),
    }
