"""Reconstruction from partial computation, measured (docs/method.md §6): every method fitted on
the fit split's row statistics and scored on held-out rows (and on fit rows, where the claims
table chooses a method), plus the transfer of a map to another layer or model."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from eigenattn.config.schema import enum
from eigenattn.config.settings import Reconstruction
from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.estimators import METHOD_KEYS, check_method, fit_heads
from eigenattn.reconstruction.metrics import METRICS, Reference
from eigenattn.spectra.stores import RowStats
from eigenattn.storage.store import open_scores

TRANSFERS = enum("reconstruction.transfer")


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
                raise InputError(
                    o.path,
                    f"model '{name}' has d={o.d}, seq_len {o.seq_len} in view '{o.view}' "
                    f"but '{stats.model}' has d={stats.d}, seq_len {stats.seq_len}",
                    "cross-model transfer needs the same seq_len: analyse both at one sampling.seq_len",
                )
            tot = o.n_layers_total
            j = min(o.layers, key=lambda x: (abs(x / max(tot - 1, 1) - depth), x))

            def pooled(o=o, j=j):
                m, U, lam = o.pooled_stats(j)
                return (
                    np.broadcast_to(m, (H, *m.shape)),
                    np.broadcast_to(U, (H, *U.shape)),
                    np.broadcast_to(lam, (H, *lam.shape)),
                )

            out.append((f"model:{name}", pooled))
    return out


def eval_row_index(m: int, k: int) -> np.ndarray:
    """k row indices evenly spread over m rows (every sequence, a stride of its queries)."""
    return np.unique(np.linspace(0, m - 1, k).round().astype(np.int64))


COLUMNS = [
    "model",
    "view",
    "split",
    "layer",
    "head",
    "estimator",
    "strategy",
    "subset_size",
    "basis_source",
    "k",
    "basis_condition",
    "solve_condition",
    *METRICS,
]


def _open_split(shards, stats: RowStats, rows_store, what: str, expect: dict | None):
    scores, attrs = open_scores(shards, expect)
    stats.check_matches(attrs["seq_len"], f"{what} scores {shards[0]}")
    held = [int(x) for x in attrs["layers"]]
    skipped = {int(x["layer"]) for x in stats.attrs.get("skipped_layers", [])}  # masked views (eigenattn.capture.masks)
    if [x for x in held if x not in skipped] != stats.layers:
        raise InputError(
            shards[0],
            f"layers {attrs['layers']} differ from the fitted statistics {stats.layers} in {rows_store}",
            "re-run extraction and eigen with the same layers",
        )
    if skipped:  # the statistics' layers only, in their order
        scores = scores[:, [held.index(x) for x in stats.layers]]
    return scores, attrs


def _layer_reference(scores, li: int, qs: slice, ks: slice, allowed, causal: bool, eval_rows) -> Reference:
    """The exact side of the metrics for one layer, from ``eval_rows`` rows spread over the split.

    Rows are chosen first and read one stored chunk of sequences at a time, so memory holds one
    chunk and the chosen rows, not the whole layer (N·H·|Q|·n scores)."""
    N, _, H, _, n = scores.shape
    nq = len(range(n)[qs])
    pick = eval_row_index(N * nq, eval_rows) if eval_rows and eval_rows < N * nq else np.arange(N * nq)
    seq, q = np.divmod(pick, nq)  # row r of the layer is query r % nq of sequence r // nq
    edges = np.cumsum((0, *scores.chunks[0]))
    parts = []
    for s0, s1 in zip(edges[:-1], edges[1:]):
        sel = (seq >= s0) & (seq < s1)
        if sel.any():
            block = scores[s0:s1, li, :, qs, :].compute()  # (chunk, H, |Q|, n) in the stored dtype
            parts.append(block[seq[sel] - s0, :, q[sel]])  # (rows, H, n)
    full = np.concatenate(parts).transpose(1, 0, 2).astype(np.float64)  # only the chosen rows are widened
    X = np.ascontiguousarray(full[..., ks])
    if qs == slice(0, n) and ks == slice(0, n):
        return Reference(X)
    return Reference(X, full, ks, np.asarray(allowed)[q] if causal else None)


def evaluate_view(
    rows_store,
    heldout_shards,
    settings: Reconstruction,
    *,
    fit_shards=None,
    other_stores=None,
    expect: dict | None = None,
    progress=True,
) -> pd.DataFrame:
    """The reconstruction table of one model and view: one row per split, layer, head, method, source.

    Every method of ``settings`` is fitted from the fit-split statistics in ``rows_store``. Its errors
    are measured on the held-out shards and, when ``fit_shards`` are given, also on fit-split rows
    (``split`` = fit), so that a best method can be chosen without looking at the held-out data it is
    reported on. Transfer rows (another layer's or model's statistics; ``other_stores`` maps
    ``settings.other_models`` to their rows stores) are measured on the held-out split only.
    """
    estimators, strategies, subset_sizes = settings.estimators, settings.strategies, settings.subset_sizes
    transfer, transfer_estimators = settings.transfer, settings.transfer_estimators
    ridge, rank, seed, eval_rows = settings.ridge, settings.rank, settings.seed, settings.eval_rows
    stats = RowStats(rows_store)
    splits = {
        "heldout": _open_split(
            heldout_shards, stats, rows_store, "held-out", expect and {**expect, "split": "heldout"}
        )[0]
    }
    if fit_shards:
        splits["fit"] = _open_split(fit_shards, stats, rows_store, "fit", expect and {**expect, "split": "fit"})[0]
    n, d = stats.seq_len, stats.d
    for e in estimators:
        for st in strategies:
            for s in subset_sizes:
                check_method(e, st, s, d)
    for e in transfer_estimators:
        check_method(e, "strided", 1, d, ("reconstruction.transfer_estimators", *METHOD_KEYS[1:]))
    for t in transfer:
        if t not in TRANSFERS:
            raise ConfigError(
                "reconstruction.transfer", f"unknown transfer '{t}'", f"use one of {', '.join(TRANSFERS)}"
            )
    others = {}
    if "other_model" in transfer and stats.view == "prefix":
        others = {name: RowStats(p) for name, p in (other_stores or {}).items()}

    qs, ks = view_slices(stats.view, n, stats.causal)
    allowed = np.ones((qs.stop - qs.start, n), dtype=bool)
    if stats.causal:
        allowed = np.arange(n)[None, :] <= np.arange(qs.start, qs.stop)[:, None]

    records = []
    bar = tqdm(total=len(stats.layers), desc=f"reconstruct {stats.model}/{stats.view}", disable=not progress)
    for li, layer in enumerate(stats.layers):
        refs = {
            split: _layer_reference(sc, li, qs, ks, allowed, stats.causal, eval_rows) for split, sc in splits.items()
        }
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
                                records.append(
                                    {
                                        "model": stats.model,
                                        "view": stats.view,
                                        "split": split,
                                        "layer": layer,
                                        "head": h,
                                        "estimator": est,
                                        "strategy": st,
                                        "subset_size": s,
                                        "basis_source": label,
                                        "k": int(m.k[h]),
                                        "basis_condition": float(m.basis_condition[h]),
                                        "solve_condition": float(m.solve_condition[h]),
                                        **{k: float(met[k][h]) for k in METRICS},
                                    }
                                )
        bar.update(1)
    bar.close()
    return pd.DataFrame.from_records(records, columns=COLUMNS)
