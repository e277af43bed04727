"""Reconstruction of attention scores from a computed subset of keys (docs/method.md §6).

Every method is a triple ``(T, W, b)`` for one head and view: compute the scores ``a_T`` of the
``s`` keys in ``T`` exactly, then estimate the whole row as ``â = W a_T + b`` (``W`` is ``d×s``).
Everything is fitted from the eigen stage's fit-split statistics only: the row mean ``μ``, the
eigenvectors ``U`` and eigenvalues ``Λ`` (the covariance is rebuilt as ``U Λ Uᵀ``).

Estimators:
- ``eigenspace``: the rows are modelled by their top-k eigenspace plus isotropic noise,
  ``a = μ + U_k c + e`` with ``c ~ N(0, Λ_k)`` and ``e ~ N(0, σ² I)``, and the coefficients are
  found by least squares on the computed keys with a ridge weighted by the eigenvalues:
  ``ĉ = argmin ‖U_k[T] c − (a_T − μ_T)‖²/σ² + cᵀ Λ_k⁻¹ c``, ``â_T̄ = μ_T̄ + U_k[T̄] ĉ``, ``â_T = a_T``.
  The rank rule is ``k = max(1, ⌊rank · s⌋)`` (``rank`` = 0.5 by default, so k < s), and
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

import logging
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

ESTIMATORS = ("eigenspace", "conditional_gaussian", "mean", "subset_only")
STRATEGIES = ("strided", "random", "pivoted_qr")
TRANSFERS = ("adjacent_layer", "farthest_layer", "other_model")
METRICS = ("rel_error", "rel_error_centered", "tv", "kl", "top1")


def check_method(estimator: str, strategy: str, s: int, d: int, key: str = "reconstruction") -> None:
    if estimator not in ESTIMATORS:
        raise ConfigError(f"{key}.estimators", f"unknown estimator '{estimator}'",
                          f"use one of {', '.join(ESTIMATORS)}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{key}.strategies", f"unknown strategy '{strategy}'", f"use one of {', '.join(STRATEGIES)}")
    if not 1 <= int(s) <= int(d):
        raise ConfigError(f"{key}.subset_sizes", f"subset size s={s} is outside 1..d={d} (the keys of the view)",
                          f"use sizes between 1 and {d}, or a longer sampling.seq_len")


def select_subset(strategy: str, d: int, s: int, U: np.ndarray | None = None, seed: int = 0,
                  key: tuple = ()) -> np.ndarray:
    """The s computed key positions (sorted, within the view's d keys)."""
    check_method("mean", strategy, s, d)
    if strategy == "strided":
        return ((2 * np.arange(s) + 1) * d) // (2 * s)
    if strategy == "random":
        rng = np.random.default_rng([int(seed), *map(int, key)])
        return np.sort(rng.choice(d, size=s, replace=False))
    # pivoted_qr
    import scipy.linalg

    if U is None:
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


def eigenspace_rank(s: int, d: int, rank: float = 0.5) -> int:
    """The eigenspace estimator's k for a subset of s keys: max(1, ⌊rank·s⌋), below s when s > 1."""
    return int(min(max(1, int(np.floor(rank * s))), max(s - 1, 1), d))


def linear_map(estimator: str, T: np.ndarray, mean: np.ndarray, U: np.ndarray, lam: np.ndarray,
               ridge: float = 1e-6, rank: float = 0.5) -> Method:
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
        A = Uk[T]                                         # s × k
        system = (A * lk) @ A.T + sigma2 * np.eye(s)      # = Cov(a_T) under the rank-k model
        W = np.linalg.solve(system, A * lk).T             # Λ_k A^T system^-1, (k × s)
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


def fit(estimator: str, strategy: str, s: int, mean: np.ndarray, U: np.ndarray, lam: np.ndarray, *,
        ridge: float = 1e-6, rank: float = 0.5, seed: int = 0, key: tuple = ()) -> Method:
    """The method for one head: the subset from ``strategy``, the map from ``estimator``."""
    d = mean.shape[0]
    check_method(estimator, strategy, s, d)
    T = select_subset(strategy, d, s, U, seed=seed, key=key)
    return linear_map(estimator, T, mean, U, lam, ridge, rank)


def fit_heads(estimator, strategy, s, mean, U, lam, *, ridge=1e-6, rank=0.5, seed=0, key=()) -> Method:
    """Methods of every head stacked along a leading head axis: T (H, s), W (H, d, s), b (H, d), …"""
    out = [fit(estimator, strategy, s, mean[h], U[h], lam[h], ridge=ridge, rank=rank, seed=seed, key=(*key, h))
           for h in range(mean.shape[0])]
    return Method(*(np.stack(x) for x in zip(*out)))


def apply(X: np.ndarray, T: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reconstruct rows X (..., m, d) from their entries at T; batched over leading head axes."""
    A_T = np.take_along_axis(X, T[..., None, :], axis=-1)
    return A_T @ np.swapaxes(W, -1, -2) + b[..., None, :]


class Reference:
    """The exact side of the metrics for one layer, computed once and shared by every method.

    ``X``: exact view rows (H, m, d). The probabilities are those of the model's whole attention
    row: ``full_rows`` (H, m, n) with the view's keys (``key_slice``) replaced by the
    reconstruction and the other keys exact, under ``allowed`` (m, n; False = masked). Without
    ``full_rows`` the view row is the whole row. Softmax work runs in float32 torch (the metrics
    need no more); the float32 score errors resolve relative errors down to about 1e-7.
    """

    def __init__(self, X: np.ndarray, full_rows: np.ndarray | None = None, key_slice: slice | None = None,
                 allowed: np.ndarray | None = None):
        import torch

        self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.key_slice = key_slice
        self.full = self.X if full_rows is None else torch.from_numpy(np.ascontiguousarray(full_rows, dtype=np.float32))
        self.masked = None if allowed is None else torch.from_numpy(~np.asarray(allowed, dtype=bool))
        exact = self._masked(self.full)
        self.logp = torch.log_softmax(exact, dim=-1)
        self.p = self.logp.exp()
        self.top = exact.argmax(dim=-1)
        xc = self.X - self.X.mean(dim=-1, keepdim=True)
        self.norm = (self.X ** 2).sum(dim=(-2, -1)).sqrt()
        self.norm_c = (xc ** 2).sum(dim=(-2, -1)).sqrt()

    def _masked(self, rows):
        return rows if self.masked is None else rows.masked_fill(self.masked, float("-inf"))

    def reconstruct(self, T: np.ndarray, W: np.ndarray, b: np.ndarray):
        """Â = X[..., T] Wᵀ + b for every head (torch float32)."""
        import torch

        idx = torch.from_numpy(np.asarray(T, dtype=np.int64))[:, None, :].expand(-1, self.X.shape[1], -1)
        A_T = torch.gather(self.X, -1, idx)
        W = torch.from_numpy(np.asarray(W, dtype=np.float32))
        b = torch.from_numpy(np.asarray(b, dtype=np.float32))
        return torch.baddbmm(b[:, None, :], A_T, W.transpose(-1, -2))

    def metrics(self, S_hat) -> dict:
        """rel_error, rel_error_centered, tv, kl (KL(p‖p̂)) and top1 per head, over all rows."""
        import torch

        S = S_hat if isinstance(S_hat, torch.Tensor) else torch.from_numpy(np.asarray(S_hat, dtype=np.float32))
        S = S.float()
        if bool(torch.isfinite(S).all()):
            err = S - self.X
            rel = (err ** 2).sum(dim=(-2, -1)).sqrt() / self.norm
            err -= err.mean(dim=-1, keepdim=True)
            rel_c = (err ** 2).sum(dim=(-2, -1)).sqrt() / self.norm_c
            rel, rel_c = rel.double().numpy(), rel_c.double().numpy()
        else:  # subset_only: no score estimate
            rel = rel_c = np.full(S.shape[:-2], np.nan)
        if self.key_slice is None:
            approx = S
        else:
            approx = self.full.clone()
            approx[..., self.key_slice] = S
        approx = self._masked(approx)
        logq = torch.log_softmax(approx, dim=-1)
        tv = 0.5 * (self.p - logq.exp()).abs().sum(dim=-1)
        kl = torch.where(self.p > 0, self.p * (self.logp - logq), torch.zeros(())).sum(dim=-1)
        top1 = (approx.argmax(dim=-1) == self.top).double()
        return {"rel_error": rel, "rel_error_centered": rel_c, "tv": tv.double().mean(dim=-1).numpy(),
                "kl": kl.double().mean(dim=-1).numpy(), "top1": top1.mean(dim=-1).numpy()}


# ----------------------------------------------------------------------------------- statistics


class RowStats:
    """The fit-split statistics of one rows.zarr (variant ``raw``): μ, U, Λ per layer and head."""

    def __init__(self, path, variant: str = "raw"):
        from .store import open_group

        g = open_group(path)
        a = g.attrs.asdict()
        if not a.get("complete"):
            raise InputError(f"{path}: store is not marked complete; re-run the eigen stage")
        if variant not in g:
            raise InputError(f"{path}: has no '{variant}' group; the eigen stage must include variant '{variant}'")
        self.path = str(path)
        self.attrs = a
        self.model = a["model"]
        self.view = a["view"]
        self.layers = [int(x) for x in a["layers"]]
        self.n_layers_total = int(a.get("n_layers_total") or max(self.layers) + 1)
        self.seq_len = int(a["seq_len"])
        self.d = int(a["d"])
        self.causal = bool(a["causal"])
        self.query_range = tuple(a["query_range"])
        self.key_range = tuple(a["key_range"])
        v = g[variant]
        self.mean, self.eigenvalues, self.eigenvectors = v["mean"][:], v["eigenvalues"][:], v["eigenvectors"][:]
        p = v["pooled"]
        self.pooled = (p["mean"][:], p["eigenvalues"][:], p["eigenvectors"][:])

    def check_matches(self, seq_len: int, what: str) -> None:
        if int(seq_len) != self.seq_len:
            raise InputError(f"{self.path}: statistics were fitted at seq_len {self.seq_len}, but {what} has "
                             f"seq_len {seq_len}; re-run the eigen stage with the same sampling.seq_len")

    def layer_pos(self, layer: int) -> int:
        if layer not in self.layers:
            raise InputError(f"{self.path}: layer {layer} was not analysed (analysed: {self.layers}); "
                             f"add it to models.{self.model}.layers")
        return self.layers.index(layer)

    def head_stats(self, layer: int):
        """(mean, U, lam) of every head of a layer: (H, d), (H, d, d), (H, d)."""
        i = self.layer_pos(layer)
        return self.mean[i], self.eigenvectors[i], self.eigenvalues[i]

    def pooled_stats(self, layer: int):
        i = self.layer_pos(layer)
        return self.pooled[0][i], self.pooled[2][i], self.pooled[1][i]


def transfer_sources(stats: RowStats, layer: int, kinds, others: dict[str, RowStats]):
    """[(basis_source label, stats function returning per-head (mean, U, lam))] for one target layer.

    Layers: the adjacent analysed layer (the next one, or the previous for the last) and the
    farthest analysed layer. Models: the layer of the other model at the nearest relative depth,
    its pooled statistics (head counts differ between models) given to every head.
    """
    out = []
    layers = stats.layers
    i = layers.index(layer)
    H = stats.mean.shape[1]
    if "adjacent_layer" in kinds and len(layers) > 1:
        j = layers[i + 1] if i + 1 < len(layers) else layers[i - 1]
        out.append((f"layer:{j}", lambda j=j: stats.head_stats(j)))
    if "farthest_layer" in kinds and len(layers) > 1:
        j = max(layers, key=lambda x: (abs(x - layer), x))
        out.append((f"layer:{j}", lambda j=j: stats.head_stats(j)))
    if "other_model" in kinds:
        depth = layer / max(stats.n_layers_total - 1, 1)
        for name, o in others.items():
            if o.d != stats.d or o.seq_len != stats.seq_len:
                raise InputError(f"{o.path}: model '{name}' has d={o.d}, seq_len {o.seq_len} in view '{o.view}' "
                                 f"but '{stats.model}' has d={stats.d}, seq_len {stats.seq_len}; "
                                 "cross-model transfer needs the same seq_len")
            tot = o.n_layers_total
            j = min(o.layers, key=lambda x: (abs(x / max(tot - 1, 1) - depth), x))

            def pooled(o=o, j=j):
                m, U, lam = o.pooled_stats(j)
                return (np.broadcast_to(m, (H, *m.shape)), np.broadcast_to(U, (H, *U.shape)),
                        np.broadcast_to(lam, (H, *lam.shape)))
            out.append((f"model:{name}", pooled))
    return out


# ---------------------------------------------------------------------------------- evaluation


def eval_row_index(m: int, k: int) -> np.ndarray:
    """k row indices evenly spread over m rows (every sequence, a stride of its queries)."""
    return np.unique(np.linspace(0, m - 1, k).round().astype(np.int64))


COLUMNS = ["model", "view", "split", "layer", "head", "estimator", "strategy", "subset_size", "basis_source", "k",
           "basis_condition", "solve_condition", *METRICS]


def _open_split(shards, stats: RowStats, rows_store, what: str):
    from .store import open_scores

    scores, attrs = open_scores(shards)
    stats.check_matches(attrs["seq_len"], f"{what} scores {shards[0]}")
    held = [int(x) for x in attrs["layers"]]
    skipped = {int(x["layer"]) for x in stats.attrs.get("skipped_layers", [])}  # masked views (eigenattn.masks)
    if [x for x in held if x not in skipped] != stats.layers:
        raise InputError(f"{shards[0]}: layers {attrs['layers']} differ from the fitted statistics "
                         f"{stats.layers} in {rows_store}; re-run extraction and eigen with the same layers")
    if skipped:  # the statistics' layers only, in their order
        scores = scores[:, [held.index(x) for x in stats.layers]]
    return scores, attrs


def _layer_reference(scores, li: int, qs: slice, ks: slice, allowed, causal: bool, eval_rows) -> Reference:
    """The exact side of the metrics for one layer, from ``eval_rows`` rows spread over the split."""
    block = scores[:, li, :, qs, :].compute()  # (N, H, |Q|, n) in the stored dtype
    N, H, nq, n = block.shape
    full = block.transpose(1, 0, 2, 3).reshape(H, N * nq, n)
    row_allowed = np.tile(allowed, (N, 1))
    if eval_rows and eval_rows < full.shape[1]:
        pick = eval_row_index(full.shape[1], eval_rows)
        full, row_allowed = full[:, pick], row_allowed[pick]
    full = np.asarray(full, dtype=np.float64)  # only the sampled rows are widened
    X = np.ascontiguousarray(full[..., ks])
    if qs == slice(0, n) and ks == slice(0, n):
        return Reference(X)
    return Reference(X, full, ks, row_allowed if causal else None)


def evaluate_view(rows_store, heldout_shards, *, estimators, strategies, subset_sizes, ridge=1e-6, rank=0.5,
                  seed=0, transfer=(), transfer_estimators=None, other_stores=None, fit_shards=None,
                  eval_rows=None, progress=True) -> "pd.DataFrame":
    """The reconstruction table of one model and view: one row per split, layer, head, method, source.

    Every method is fitted from the fit-split statistics in ``rows_store``. Its errors are measured on
    the held-out shards and, when ``fit_shards`` are given, also on fit-split rows (``split`` = fit),
    so that a best method can be chosen without looking at the held-out data it is reported on.
    Transfer rows (another layer's or model's statistics) are measured on the held-out split only.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .moments import view_slices

    stats = RowStats(rows_store)
    splits = {"heldout": _open_split(heldout_shards, stats, rows_store, "held-out")[0]}
    if fit_shards:
        splits["fit"] = _open_split(fit_shards, stats, rows_store, "fit")[0]
    n, d = stats.seq_len, stats.d
    for e in estimators:
        for st in strategies:
            for s in subset_sizes:
                check_method(e, st, s, d)
    for e in transfer_estimators or ():
        check_method(e, "strided", 1, d)
    for t in transfer:
        if t not in TRANSFERS:
            raise ConfigError("reconstruction.transfer", f"unknown transfer '{t}'",
                              f"use one of {', '.join(TRANSFERS)}")
    others = {}
    if "other_model" in transfer and stats.view == "prefix":
        others = {name: RowStats(p) for name, p in (other_stores or {}).items()}
    transfer_estimators = list(estimators if transfer_estimators is None else transfer_estimators)

    qs, ks = view_slices(stats.view, n, stats.causal)
    allowed = np.ones((qs.stop - qs.start, n), dtype=bool)
    if stats.causal:
        allowed = np.arange(n)[None, :] <= np.arange(qs.start, qs.stop)[:, None]

    records = []
    bar = tqdm(total=len(stats.layers), desc=f"reconstruct {stats.model}/{stats.view}", disable=not progress)
    for li, layer in enumerate(stats.layers):
        refs = {split: _layer_reference(sc, li, qs, ks, allowed, stats.causal, eval_rows)
                for split, sc in splits.items()}
        sources = [("same", lambda layer=layer: stats.head_stats(layer))]
        if transfer:
            sources += transfer_sources(stats, layer, transfer, others)
        for label, get in sources:
            mean, U, lam = get()
            ests = estimators if label == "same" else transfer_estimators
            on = refs if label == "same" else {"heldout": refs["heldout"]}
            for st in strategies:
                for s in subset_sizes:
                    for est in ests:
                        m = fit_heads(est, st, s, mean, U, lam, ridge=ridge, rank=rank, seed=seed, key=(layer,))
                        for split, ref in on.items():
                            met = ref.metrics(ref.reconstruct(m.T, m.W, m.b))
                            for h in range(len(m.T)):
                                records.append({"model": stats.model, "view": stats.view, "split": split,
                                                "layer": layer, "head": h, "estimator": est, "strategy": st,
                                                "subset_size": s, "basis_source": label, "k": int(m.k[h]),
                                                "basis_condition": float(m.basis_condition[h]),
                                                "solve_condition": float(m.solve_condition[h]),
                                                **{k: float(met[k][h]) for k in METRICS}})
        bar.update(1)
    bar.close()
    return pd.DataFrame.from_records(records, columns=COLUMNS)
