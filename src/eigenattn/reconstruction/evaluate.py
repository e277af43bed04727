"""Reconstruction from partial computation, measured (docs/method.md §6): every method fitted on
the fit split's row statistics and scored on held-out rows (and on fit rows, where the claims
table chooses a method), plus the transfer of a map to another layer or model."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from eigenattn.capture.recompute import open_token_shard
from eigenattn.config.schema import enum
from eigenattn.config.settings import Reconstruction
from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction import peers as peer_methods
from eigenattn.reconstruction.cost import cost_share, family, view_macs
from eigenattn.reconstruction.estimators import METHOD_KEYS, check_method, fit_heads
from eigenattn.reconstruction.metrics import METRICS, Reference
from eigenattn.reconstruction.workers import map_in_threads
from eigenattn.spectra.stores import RowStats
from eigenattn.storage.store import open_scores

TRANSFERS = enum("reconstruction.transfer")
log = logging.getLogger(__name__)


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
    "family",
    "attn_macs",
    "cost_share",
]


def _open_split(shards, stats: RowStats, rows_store, what: str, expect: dict | None):
    scores, attrs = open_scores(shards, expect, recompute=open_token_shard)
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


def _layer_reference(scores, li: int, qs: slice, ks: slice, allowed, causal: bool, eval_rows, peers=None):
    """The exact side of the metrics for one layer, from ``eval_rows`` rows spread over the split,
    and the estimates of ``peers`` for the same rows.

    Rows are chosen first and read one stored chunk of sequences at a time, so memory holds one
    chunk and the chosen rows, not the whole layer (N·H·|Q|·n scores). ``peers``: a function of one
    chunk's view blocks (float64 torch, (c, H, |Q|, d)) and the chosen rows' (sequence, query) indices
    into them, returning {name: estimate} for those rows
    (:func:`eigenattn.reconstruction.peers.estimate_rows`). It sees the whole sequences that hold
    chosen rows: nystrom's landmarks and vertical_slash's last queries need them."""
    N, _, H, _, n = scores.shape
    nq = len(range(n)[qs])
    pick = eval_row_index(N * nq, eval_rows) if eval_rows and eval_rows < N * nq else np.arange(N * nq)
    seq, q = np.divmod(pick, nq)  # row r of the layer is query r % nq of sequence r // nq
    edges = np.cumsum((0, *scores.chunks[0]))
    parts, peer_parts = [], []
    for s0, s1 in zip(edges[:-1], edges[1:]):
        sel = (seq >= s0) & (seq < s1)
        if sel.any():
            block = scores[s0:s1, li, :, qs, :].compute()  # (chunk, H, |Q|, n) in the stored dtype
            parts.append(block[seq[sel] - s0, :, q[sel]])  # (rows, H, n)
            if peers is not None:
                used, at = np.unique(seq[sel] - s0, return_inverse=True)
                X = torch.from_numpy(np.ascontiguousarray(block[used][..., ks], dtype=np.float64))
                rows = {name: (e[0], *(x.float() for x in e[1:])) for name, e in peers(X, at, q[sel]).items()}
                peer_parts.append(rows)  # each (rows, H, d) [, (rows, H)]
    full = np.concatenate(parts).transpose(1, 0, 2).astype(np.float64)  # only the chosen rows are widened
    X = np.ascontiguousarray(full[..., ks])
    estimates = {}
    for name in peer_parts[0] if peer_parts else ():
        kind = peer_parts[0][name][0]
        pieces = zip(*(pp[name][1:] for pp in peer_parts))
        estimates[name] = (kind, *(torch.cat(p).transpose(0, 1).contiguous() for p in pieces))  # (H, rows, …)
    if qs == slice(0, n) and ks == slice(0, n):
        return Reference(X), estimates
    return Reference(X, full, ks, np.asarray(allowed)[q] if causal else None), estimates


def _bilinear_layers(attrs: dict, layers) -> dict[int, bool]:
    """Per layer: are the stored scores exactly scale·QKᵀ (no position bias, softcap or sink)? From
    the store's ``layer_modifiers``; a store without them counts as not plain."""
    held = [int(x) for x in attrs["layers"]]
    mods = attrs.get("layer_modifiers")
    if mods is None:  # a store that does not say: not known to be plain
        return {layer: False for layer in layers}
    plain = {layer: not any(bool(v) for v in m.values()) for layer, m in zip(held, mods)}
    return {layer: plain.get(layer, False) for layer in layers}


def evaluate_view(
    rows_store,
    heldout_shards,
    settings: Reconstruction,
    *,
    fit_shards=None,
    other_stores=None,
    expect: dict | None = None,
    progress=True,
    workers: int = 1,
) -> pd.DataFrame:
    """The reconstruction table of one model and view: one row per split, layer, head, method, source.

    Every method of ``settings`` is fitted from the fit-split statistics in ``rows_store``. Its errors
    are measured on the held-out shards and, when ``fit_shards`` are given, also on fit-split rows
    (``split`` = fit), so that a best method can be chosen without looking at the held-out data it is
    reported on. Transfer rows (another layer's or model's statistics; ``other_stores`` maps
    ``settings.other_models`` to their rows stores) are measured on the held-out split only.

    ``workers`` > 1 evaluates that many layers side by side in threads (torch, numpy and scipy
    release the GIL), each with one BLAS and one torch thread, which is what a single-threaded run
    uses: the table is the same, row order included (:mod:`eigenattn.reconstruction.workers`).
    """
    estimators, strategies, subset_sizes = settings.estimators, settings.strategies, settings.subset_sizes
    transfer, transfer_estimators = settings.transfer, settings.transfer_estimators
    ridge, rank, seed, eval_rows = settings.ridge, settings.rank, settings.seed, settings.eval_rows
    stats = RowStats(rows_store)
    held, held_attrs = _open_split(
        heldout_shards, stats, rows_store, "held-out", expect and {**expect, "split": "heldout"}
    )
    splits = {"heldout": held}
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
    nq = qs.stop - qs.start
    d_head = int(held_attrs.get("head_dim") or 0)
    if not d_head:
        raise InputError(heldout_shards[0], "the score store has no head_dim attribute", "re-run extraction")
    geometry = peer_methods.Geometry(np.arange(qs.start, qs.stop), np.arange(ks.start, ks.stop), allowed[:, ks])
    ps = settings.peer_settings
    peers = list(ps.methods)
    for m in peers:
        for s in subset_sizes:
            peer_methods.check_peer(m, s, geometry, ps.key)
    bilinear = _bilinear_layers(held_attrs, stats.layers)
    biased = [layer for layer in stats.layers if not bilinear[layer]]
    if "nystrom" in peers and biased and ps.explicit:
        raise ConfigError(
            ps.key,
            f"nystrom needs scores that are exactly scale·QKᵀ, but layers {biased} of '{stats.model}' add "
            "a position bias, a softcap or a sink",
            f"leave nystrom out of {ps.key} for this model (auto does)",
        )

    def cost(method: str, s: int, k: int = 0) -> dict:
        kw = {"nq": nq, "d": d, "d_head": d_head, "s": s, "k": k, "q_last": min(ps.q_last, nq)}
        return {"family": family(method), "attn_macs": view_macs(method, **kw), "cost_share": cost_share(method, **kw)}

    def layer_records(li: int) -> list[dict]:
        layer, records = stats.layers[li], []
        layer_peers = [m for m in peers if m != "nystrom" or bilinear[layer]]
        if len(layer_peers) < len(peers):
            log.info("layer %d: nystrom skipped (its scores carry a position bias, softcap or sink)", layer)

        def run_peers(X, seq, q, layer_peers=layer_peers):
            kw = {"q_last": ps.q_last, "sinks": ps.sinks}
            return {
                (m, v, s): peer_methods.estimate_rows(m, X, s, geometry, seq, q, **kw, pinv=v)
                for m in layer_peers
                for v in ps.variants(m)
                for s in subset_sizes
            }

        refs, estimates = {}, {}
        for split, sc in splits.items():
            refs[split], estimates[split] = _layer_reference(
                sc, li, qs, ks, allowed, stats.causal, eval_rows, run_peers if layer_peers else None
            )
        sources = [("same", lambda layer=layer: stats.head_stats(layer))]
        if transfer:
            sources += transfer_sources(stats, layer, transfer, others)

        def record(split, est, st, s, label, met, h, k=0, bc=np.nan, sc=np.nan):
            return {
                "model": stats.model,
                "view": stats.view,
                "split": split,
                "layer": layer,
                "head": h,
                "estimator": est,
                "strategy": st,
                "subset_size": s,
                "basis_source": label,
                "k": int(k),
                "basis_condition": float(bc),
                "solve_condition": float(sc),
                **{key: float(met[key][h]) for key in METRICS},
                **cost(est, s, int(k)),
            }

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
                                    record(
                                        split,
                                        est,
                                        st,
                                        s,
                                        label,
                                        met,
                                        h,
                                        m.k[h],
                                        m.basis_condition[h],
                                        m.solve_condition[h],
                                    )
                                )
        for split, ref in refs.items():
            for (name, variant, s), e in estimates[split].items():
                met = ref.metrics(e[1]) if e[0] == "logits" else ref.metrics_probs(e[1], e[2])
                for h in range(ref.X.shape[0]):
                    records.append(record(split, name, variant, s, "same", met, h))
        return records

    records = []
    bar = tqdm(total=len(stats.layers), desc=f"reconstruct {stats.model}/{stats.view}", disable=not progress)
    for layer_rows in map_in_threads(layer_records, range(len(stats.layers)), workers):
        records += layer_rows
        bar.update(1)
    bar.close()
    return pd.DataFrame.from_records(records, columns=COLUMNS)
