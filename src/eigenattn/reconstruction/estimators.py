"""Estimators and subset strategies for reconstructing attention scores from a computed subset of
keys (docs/method.md §6).

Every method is a triple ``(T, W, b)`` for one head and view: compute the scores ``a_T`` of the
``s`` keys in ``T`` exactly, then estimate the whole row as ``â = W a_T + b`` (``W`` is ``d×s``).
Everything is fitted from the eigen stage's fit-split statistics only: the row mean ``μ``, the
eigenvectors ``U`` and eigenvalues ``Λ`` (the covariance is rebuilt as ``U Λ Uᵀ``).

Estimators:
- ``eigenspace``: the rows are modelled by their top-k eigenspace plus isotropic noise,
  ``a = μ + U_k c + e`` with ``c ~ N(0, Λ_k)`` and ``e ~ N(0, σ² I)``, and the coefficients are
  found by least squares on the computed keys with a ridge weighted by the eigenvalues:
  ``ĉ = argmin ‖U_k[T] c − (a_T − μ_T)‖²/σ² + cᵀ Λ_k⁻¹ c``, ``â_T̄ = μ_T̄ + U_k[T̄] ĉ``, ``â_T = a_T``.
  The rank rule is ``k = max(1, ⌊rank · s⌋)`` (``reconstruction.eigenspace_rank``, so k < s), and
  ``σ²`` is the mean of the discarded eigenvalues (the probabilistic-PCA noise), floored at
  ``ridge · tr(C)/d``. Without the weighting (``k = s``, a plain pseudo-inverse) the system
  ``U_k[T]`` is ill-conditioned and the held-out error grows with s.
- ``conditional_gaussian``: ``â_T̄ = μ_T̄ + C_T̄T (C_TT + εI)⁻¹ (a_T − μ_T)``, ``â_T = a_T``
  (the MMSE linear estimator), with ``ε = ridge · tr(C_TT)/s``.
- ``mean`` (baseline): ``â_T̄ = μ_T̄``, ``â_T = a_T``.
- ``subset_only`` (baseline): ``â_T = a_T`` and ``−∞`` elsewhere, so the softmax attends to
  ``T`` alone (sparse attention). It estimates no scores, so its score errors are undefined
  (NaN) and ``KL(p‖p̂)`` is infinite whenever ``p`` has mass outside ``T``.

Subset strategies: ``strided`` (evenly spaced keys), ``random`` (seeded per layer and head) and
``pivoted_qr`` (the first ``s`` pivots of a column-pivoted QR of ``U_sᵀ``, as in DEIM/CUR).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

from eigenattn.config.schema import enum
from eigenattn.errors import ConfigError

ESTIMATORS = enum("reconstruction.estimators")
STRATEGIES = enum("reconstruction.strategies")
METHOD_KEYS = ("reconstruction.estimators", "reconstruction.strategies", "reconstruction.subset_sizes")


def check_method(estimator: str, strategy: str, s: int, d: int, keys: tuple[str, str, str] = METHOD_KEYS) -> None:
    """``keys``: the config keys that the estimator, the strategy and s come from."""
    if estimator not in ESTIMATORS:
        raise ConfigError(keys[0], f"unknown estimator '{estimator}'", f"use one of {', '.join(ESTIMATORS)}")
    if strategy not in STRATEGIES:
        raise ConfigError(keys[1], f"unknown strategy '{strategy}'", f"use one of {', '.join(STRATEGIES)}")
    if not 1 <= int(s) <= int(d):
        raise ConfigError(
            keys[2],
            f"subset size s={s} is outside 1..d={d} (the keys of the view)",
            f"use subset sizes between 1 and {d}",
        )


def select_subset(
    strategy: str, d: int, s: int, U: np.ndarray | None = None, *, seed: int, key: tuple = ()
) -> np.ndarray:
    """The s computed key positions (sorted, within the view's d keys)."""
    check_method("mean", strategy, s, d)
    if strategy == "strided":
        return ((2 * np.arange(s) + 1) * d) // (2 * s)
    if strategy == "random":
        rng = np.random.default_rng([int(seed), *map(int, key)])
        return np.sort(rng.choice(d, size=s, replace=False))
    if U is None:  # pivoted_qr
        raise ValueError("pivoted_qr needs the eigenvectors U")
    _, _, piv = scipy.linalg.qr(U[:, :s].T, pivoting=True, mode="economic")
    return np.sort(piv[:s])


class Method(NamedTuple):
    """One fitted method: the subset ``T`` and the map ``â = W a_T + b``, with its diagnostics.

    ``k``: the eigenspace rank (``eigenspace`` only, else 0); ``basis_condition``: condition number
    of ``U_k[T]`` (``eigenspace``); ``solve_condition``: condition number of the s×s system the
    estimator solves (``eigenspace``, ``conditional_gaussian``); NaN where not defined. Fields are
    arrays with a leading head axis when returned by :func:`fit_heads`.
    """

    T: np.ndarray
    W: np.ndarray
    b: np.ndarray
    k: int | np.ndarray = 0
    basis_condition: float | np.ndarray = np.nan
    solve_condition: float | np.ndarray = np.nan


def eigenspace_rank(s: int, d: int, rank: float) -> int:
    """The eigenspace estimator's k for a subset of s keys: max(1, ⌊rank·s⌋), below s when s > 1."""
    return int(min(max(1, int(np.floor(rank * s))), max(s - 1, 1), d))


def linear_map(
    estimator: str, T: np.ndarray, mean: np.ndarray, U: np.ndarray, lam: np.ndarray, *, ridge: float, rank: float
) -> Method:
    """The map of an estimator for the subset T: â = W a_T + b, W is d×s."""
    d, s = mean.shape[0], len(T)
    check_method(estimator, "strided", s, d)
    T = np.asarray(T)
    eye = np.zeros((d, s))
    eye[T, np.arange(s)] = 1.0
    lam = np.clip(lam, 0.0, None)
    floor = ridge * max(float(lam.sum()) / d, np.finfo(np.float64).tiny)
    if estimator == "eigenspace":
        k = eigenspace_rank(s, d, rank)
        Uk, lk = U[:, :k], lam[:k]
        sigma2 = max(float(lam[k:].sum()) / max(d - k, 1), floor)
        A = Uk[T]  # s × k
        system = (A * lk) @ A.T + sigma2 * np.eye(s)  # = Cov(a_T) under the rank-k model
        W = np.linalg.solve(system, A * lk).T  # Λ_k A^T system^-1, (k × s)
        W = Uk @ W
        W[T] = np.eye(s)
        return Method(T, W, mean - W @ mean[T], k, float(np.linalg.cond(A)), float(np.linalg.cond(system)))
    if estimator == "conditional_gaussian":
        C = (U * lam) @ U.T
        ctt = C[np.ix_(T, T)]
        eps = ridge * max(float(np.trace(ctt)) / s, np.finfo(np.float64).tiny)
        system = ctt + eps * np.eye(s)
        # C[:, T] (C_TT + eps I)^-1, by a symmetric solve
        W = np.linalg.solve(system, C[T, :]).T
        W[T] = np.eye(s)
        return Method(T, W, mean - W @ mean[T], solve_condition=float(np.linalg.cond(system)))
    if estimator == "mean":
        b = mean.copy()
        b[T] = 0.0
        return Method(T, eye, b)
    # subset_only
    b = np.full(d, -np.inf)
    b[T] = 0.0
    return Method(T, eye, b)


def fit(
    estimator: str,
    strategy: str,
    s: int,
    mean: np.ndarray,
    U: np.ndarray,
    lam: np.ndarray,
    *,
    ridge: float,
    rank: float,
    seed: int,
    key: tuple = (),
) -> Method:
    """The method for one head: the subset from ``strategy``, the map from ``estimator``."""
    d = mean.shape[0]
    check_method(estimator, strategy, s, d)
    T = select_subset(strategy, d, s, U, seed=seed, key=key)
    return linear_map(estimator, T, mean, U, lam, ridge=ridge, rank=rank)


def fit_heads(
    estimator, strategy, s, mean, U, lam, *, ridge: float, rank: float, seed: int, key=(), heads=None
) -> Method:
    """Methods of every head stacked along a leading head axis: T (H, s), W (H, d, s), b (H, d), …

    ``heads``: the model's head indices of the rows of ``mean`` (default 0..H-1), so that a subset
    of a layer's heads gets the same (seeded) fits as the whole layer."""
    labels = range(mean.shape[0]) if heads is None else [int(h) for h in heads]
    out = [
        fit(estimator, strategy, s, mean[i], U[i], lam[i], ridge=ridge, rank=rank, seed=seed, key=(*key, h))
        for i, h in enumerate(labels)
    ]
    return Method(*(np.stack(x) for x in zip(*out)))


def apply(X: np.ndarray, T: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reconstruct rows X (..., m, d) from their entries at T; batched over leading head axes."""
    A_T = np.take_along_axis(X, T[..., None, :], axis=-1)
    return A_T @ np.swapaxes(W, -1, -2) + b[..., None, :]
