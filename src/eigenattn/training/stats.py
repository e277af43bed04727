"""Intervals for comparing training runs (docs/method.md §8, "Noise").

Every run is scored on the same held-out tokens, and every variant is trained with the same seeds
as exact (the same initialisation where the shapes allow, the same batch order and masks). A
comparison is therefore a *crossed, paired* design: seeds × tokens. Its data are a matrix
``X[k, t]`` per group of tokens: the contrast of the runs of seed ``k`` on token ``t`` (for
example ``correct_variant − correct_exact``, or ``correct_variant − ½ correct_exact −
½ correct_floor``). The estimate is the mean of ``X``, and its variance has two parts that do not
shrink together:

- **seeds** (``A``): the variance of the per-seed means ``X̄_k`` over the ``K`` seeds, divided by
  ``K`` (``K − 1`` degrees of freedom). It is the paired, per-seed difference; with few seeds it is
  the dominant and least certain part;
- **tokens** (``B``): the variance of the per-token means ``X̄_t`` over the ``n`` tokens, divided by
  ``n``, less the seed-by-token residual that ``A`` already holds (two-way random-effects mean
  squares; ``n − 1`` degrees of freedom). It is the paired, per-token variance: tokens that every
  run gets right or wrong cancel.

The 95% interval is the estimate ± ``t(0.975, ν) · √(A + ΣB)`` with Welch–Satterthwaite degrees of
freedom over the mean squares that make up ``A + ΣB`` (seeds: ``K − 1``; tokens: ``n − 1``;
residual: ``(K − 1)(n − 1)``). Groups of different tokens (held-out windows
against their shuffled copies) add their own ``B``. With one seed, ``A`` cannot be measured and the
interval is NaN: the rows say so rather than assume a seed noise.

``tests/test_train_stats.py`` checks the coverage by simulation at the default's sizes, and that a
normal quantile misses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided interval at ``LEVEL``."""

    estimate: float
    low: float
    high: float
    se: float
    df: float
    seeds: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _token_part(X: np.ndarray) -> tuple[float, float]:
    """``B`` of one group and its share of the Satterthwaite denominator.

    ``B = (MS_tok − MS_err) / (K n)``: the per-token mean square of the contrast less the
    seed × token residual mean square, which the seed part already holds; floored at 0 (then the
    group adds nothing). The residual is subtracted, so it counts in the degrees of freedom too:
    where it is as large as the token mean square, B is noise and ν falls to the seeds' K − 1.
    """
    K, n = X.shape
    tok = X.mean(axis=0)
    ms_tok = K * float(tok.var(ddof=1))
    if K < 2:
        return ms_tok / n, 0.0
    resid = X - X.mean(axis=1, keepdims=True) - tok[None, :] + X.mean()
    ms_err = float((resid**2).sum()) / ((K - 1) * (n - 1))
    b = (ms_tok - ms_err) / (K * n)
    if b <= 0:
        return 0.0, 0.0
    return b, (ms_tok / (K * n)) ** 2 / (n - 1) + (ms_err / (K * n)) ** 2 / ((K - 1) * (n - 1))


def crossed_interval(*groups, weights=None, level: float = LEVEL) -> Interval:
    """The interval of ``Σ_g w_g · mean(X_g)`` for matrices ``X_g`` (seeds × tokens of group g).

    Every group has the same seeds in the same order (rows); each group has its own tokens
    (columns). See the module docstring for the variance and the degrees of freedom.
    """
    groups = [np.atleast_2d(np.asarray(X, dtype=np.float64)) for X in groups]
    w = np.ones(len(groups)) if weights is None else np.asarray(weights, dtype=np.float64)
    K = groups[0].shape[0]
    if any(X.shape[0] != K for X in groups):
        raise ValueError(f"every group needs the same seeds, got {[X.shape[0] for X in groups]} rows")
    per_seed = sum(wg * X.mean(axis=1) for wg, X in zip(w, groups))
    est = float(per_seed.mean())
    if K < 2:
        return Interval(est, np.nan, np.nan, np.nan, np.nan, K)
    A = float(per_seed.var(ddof=1)) / K
    parts = [_token_part(X) for X in groups]
    var = A + sum(wg**2 * b for wg, (b, _) in zip(w, parts))
    if var <= 0:
        return Interval(est, est, est, 0.0, np.inf, K)
    df = var**2 / (A**2 / (K - 1) + sum(wg**4 * d for wg, (_, d) in zip(w, parts)))
    se = float(np.sqrt(var))
    q = float(sps.t.ppf(0.5 + level / 2, df))
    return Interval(est, est - q * se, est + q * se, se, float(df), K)
