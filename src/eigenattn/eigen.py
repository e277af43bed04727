"""Eigen analysis of attention scores: row covariances (METHOD.md §3) and whole view blocks via
the Gram matrix (§4). All reductions are Dask graphs; the scheduler is chosen by the caller."""

from __future__ import annotations

import numpy as np

from .moments import (block_moments, check_variant, half_block_index, merge_packed, moments_to_covariance,
                      reduce_moments, unpack, view_slices, whole_heads)

P_LEVELS = (0.90, 0.95, 0.99)


def eigh_desc(cov: np.ndarray):
    """Eigenvalues (descending) and eigenvectors (columns) of symmetric matrices (..., d, d).

    Signs are fixed so that the largest-magnitude component of each eigenvector is positive,
    making outputs deterministic across BLAS builds and chunkings.
    """
    w, v = np.linalg.eigh(cov)
    w, v = w[..., ::-1], v[..., ::-1]
    idx = np.abs(v).argmax(axis=-2)
    sign = np.sign(np.take_along_axis(v, idx[..., None, :], axis=-2))
    sign[sign == 0] = 1
    return np.clip(w, 0.0, None), v * sign


def explained_variance(eigenvalues: np.ndarray, total: np.ndarray | float | None = None) -> np.ndarray:
    """EV(k) for k = 1..r along the last axis: cumulative eigenvalue sum over the total variance."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    tot = eigenvalues.sum(axis=-1) if total is None else np.asarray(total, dtype=np.float64)
    return np.cumsum(eigenvalues, axis=-1) / np.where(tot > 0, tot, 1.0)[..., None]


def k_at(ev: np.ndarray, p: float) -> np.ndarray:
    """Smallest k (1-based) with EV(k) >= p, along the last axis."""
    reached = ev >= p - 1e-12
    k = reached.argmax(axis=-1) + 1
    return np.where(reached.any(axis=-1), k, ev.shape[-1])


def _spectra(packed: np.ndarray) -> dict:
    out = {}
    for scope, pk in (("heads", packed), ("pooled", merge_packed(packed, axis=1, keepdims=False))):
        count, mean, m2 = unpack(pk)
        w, v = eigh_desc(moments_to_covariance(count, m2))
        out[scope] = {"mean": mean, "eigenvalues": w, "eigenvectors": v, "count": count.astype(np.int64)}
    return out


def row_spectrum(scores, view: str, variant: str, causal: bool, split_every: int = 8,
                 halves: bool = False) -> dict:
    """Per-head and pooled row spectra (numpy arrays keyed as in rows.zarr).

    With ``halves``, the moments of the first and second half of the sequences (split at a chunk
    boundary) are reduced separately and merged exactly into the total, so the split-half spectra
    (used as the noise ceiling of subspace overlap) cost no extra pass over the data.
    """
    import dask

    per_block = block_moments(scores, view, variant, causal)
    if not halves:
        (packed,) = dask.compute(reduce_moments(per_block, split_every))
        return _spectra(packed)
    i = half_block_index(scores.chunks[0])
    pa, pb = dask.compute(reduce_moments(per_block[:i], split_every), reduce_moments(per_block[i:], split_every))
    out = _spectra(merge_packed(np.stack([pa, pb]), axis=0, keepdims=False))
    out["halves"] = {"a": _spectra(pa), "b": _spectra(pb), "split_sequence": int(np.sum(scores.chunks[0][:i]))}
    return out


def _view_vectors(block, qs, ks, variant, shift=None):
    """Vectorised view blocks of a score block (b, L, H, n, n) -> float64 (b, L, H, |Q||K|)."""
    x = np.asarray(block[..., qs, ks], dtype=np.float64)
    if variant == "row_centered":
        x = x - x.mean(axis=-1, keepdims=True)
    x = x.reshape(x.shape[:3] + (-1,))
    return x if shift is None else x - shift


def full_gram(scores, view: str, variant: str, causal: bool):
    """Dask graph of Gram matrices (L, H, N, N) of vectorised view blocks; returns (graph, N, D).

    The uncentred Gram of shifted samples G0 = (V - c)(V - c)^T is accumulated blockwise and
    centred exactly with H = I - 11^T/N: G = H G0 H (the centred Gram is shift invariant; the
    shift c, the first sequence's block, keeps the float64 sums well conditioned). One pass over
    the data; no (|Q||K|)-dimensional covariance is ever formed.
    """
    import dask.array as da

    check_variant(variant)
    n = scores.shape[-1]
    qs, ks = view_slices(view, n, causal)
    D = (qs.stop - qs.start) * (ks.stop - ks.start)
    scores = whole_heads(scores)
    shift = _view_vectors(scores[:1].compute(), qs, ks, variant)[0]  # (L, H, D): small

    def vectors(block, block_info=None):
        lo, hi = block_info[0]["array-location"][1]  # this block's layers
        return _view_vectors(block, qs, ks, variant, shift[lo:hi])

    vec = da.map_blocks(vectors, scores, dtype=np.float64, drop_axis=[4], chunks=scores.chunks[:3] + ((D,),),
                        meta=np.empty((0, 0, 0, 0), dtype=np.float64))
    g0 = da.einsum("nlhd,mlhd->lhnm", vec, vec, dtype=np.float64)
    return g0, vec.shape[0], D


def center_gram(g0: np.ndarray) -> np.ndarray:
    N = g0.shape[-1]
    h = np.eye(N) - 1.0 / N
    return h @ g0 @ h


def full_spectrum(scores, view: str, variant: str, causal: bool) -> dict:
    """Eigenvalues of the sample covariance of vectorised view blocks, and the exact total variance.

    The nonzero eigenvalues of C = Vc^T Vc / (N-1) equal those of the Gram Vc Vc^T / (N-1); the total
    variance (sum of per-coordinate variances) is trace(C) = trace(G) / (N-1), exactly.
    """
    import dask

    g0, N, D = full_gram(scores, view, variant, causal)
    (g0,) = dask.compute(g0)
    g = center_gram(g0)
    w = np.linalg.eigvalsh(g)[..., ::-1] / (N - 1)
    total = np.trace(g, axis1=-2, axis2=-1) / (N - 1)
    r = min(N - 1, D)
    return {"eigenvalues": np.clip(w[..., :r], 0.0, None), "total_variance": total, "n_samples": N, "dim": D}


def _store_attrs(attrs: dict, view: str, causal: bool, n_seq: int, extra: dict) -> dict:
    from . import __version__

    n = attrs["seq_len"]
    qs, ks = view_slices(view, n, causal)
    return {"model": attrs["model"], "view": view, "causal": causal, "layers": attrs["layers"],
            "heads": attrs["heads"], "n_layers_total": attrs.get("n_layers_total"),
            "seq_len": n, "query_range": [qs.start, qs.stop],
            "key_range": [ks.start, ks.stop], "d": ks.stop - ks.start, "n_sequences": n_seq,
            "corpus": attrs.get("corpus"), "seed": attrs.get("seed"), "split": "fit",
            "scores_dtype": attrs.get("dtype"), "skipped_layers": attrs.get("skipped_layers", []),
            "eigenattn_version": __version__, **extra}


def _open_fit(shards, view: str, variants):
    """Open the fit shards and fail early on an undefined view or unknown variant."""
    from .masks import select_visible
    from .store import open_scores

    scores, attrs = open_scores(shards)
    causal = bool(attrs["causal"])
    view_slices(view, attrs["seq_len"], causal)
    for v in variants:
        check_variant(v)
    scores, attrs = select_visible(scores, attrs, view)  # layers whose mask hides part of the view are skipped
    return scores, attrs, causal


def run_rows(shards, out_path, view: str, variants=("raw", "row_centered"), split_every: int = 8,
             halves_path=None) -> dict:
    """Row analysis of all fit shards into rows.zarr (groups per variant, with pooled/ subgroups).

    With ``halves_path``, the spectra of the two halves of the fit sequences go to a second store
    (groups {variant}/{a,b}/ shaped like rows.zarr's), read by the overlap stage.
    """
    import zarr

    from .store import atomic_store, write_arrays

    scores, attrs, causal = _open_fit(shards, view, variants)
    results = {v: row_spectrum(scores, view, v, causal, split_every, halves=halves_path is not None)
               for v in variants}
    if halves_path is not None:
        with atomic_store(halves_path) as tmp:
            root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
            for v, res in results.items():
                for half in ("a", "b"):
                    g = root.require_group(f"{v}/{half}")
                    write_arrays(g, res["halves"][half]["heads"])
                    write_arrays(g.require_group("pooled"), res["halves"][half]["pooled"])
            split = results[variants[0]]["halves"]["split_sequence"]
            root.attrs.update(_store_attrs(attrs, view, causal, scores.shape[0], {
                "analysis": "rows_halves", "variants": list(variants), "split_sequence": split,
                "halves": {"a": [0, split], "b": [split, int(scores.shape[0])]},
                "definition": "row spectra (as rows.zarr) of the first (a) and second (b) half of the fit "
                              "sequences in passage_id order",
                "complete": True}))
    with atomic_store(out_path) as tmp:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        for v, res in results.items():
            g = root.require_group(v)
            write_arrays(g, res["heads"])
            write_arrays(g.require_group("pooled"), res["pooled"])
        root.attrs.update(_store_attrs(attrs, view, causal, scores.shape[0], {
            "analysis": "rows", "variants": list(variants),
            "axes": {"mean": ["layer", "head", "key"], "eigenvalues": ["layer", "head", "component"],
                     "eigenvectors": ["layer", "head", "key", "component"], "count": ["layer", "head"]},
            "definition": "covariance of score rows S[i, keys] over queries i in the view and fit sequences; "
                          "eigenvalues descending, eigenvectors are columns; pooled/ merges the heads of a layer",
            "complete": True}))
    return results


def run_full(shards, out_path, view: str, variants=("raw", "row_centered")) -> dict:
    """Full-matrix analysis into full.zarr: the `raw` variant at the root, others in subgroups."""
    import zarr

    from .store import atomic_store, write_arrays

    scores, attrs, causal = _open_fit(shards, view, variants)
    results = {v: full_spectrum(scores, view, v, causal) for v in variants}
    with atomic_store(out_path) as tmp:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        for v, res in results.items():
            g = root if v == "raw" else root.require_group(v)
            write_arrays(g, {"eigenvalues": res["eigenvalues"], "total_variance": res["total_variance"]},
                         {"n_samples": res["n_samples"], "dim": res["dim"], "variant": v})
        root.attrs.update(_store_attrs(attrs, view, causal, scores.shape[0], {
            "analysis": "full", "variants": list(variants),
            "axes": {"eigenvalues": ["layer", "head", "component"], "total_variance": ["layer", "head"]},
            "definition": "eigenvalues of the covariance of vectorised view blocks (one sample per sequence) "
                          "via the centred Gram matrix; total_variance = sum of per-coordinate variances",
            "complete": True}))
    return results


def is_bounded(k: np.ndarray, n_samples: int, dim: int) -> np.ndarray:
    """k_p is reported as a lower bound ('>=') when the sample rank limits it.

    With N samples the sample covariance has rank <= N-1. When that is below the dimension and
    k_p needs at least half of those N-1 directions, the sample spectrum cannot resolve the
    population's k_p, so the value is only a lower bound.
    """
    r = n_samples - 1
    return (r < dim) & (np.asarray(k) >= max(r, 1) / 2)


def spectrum_table(rows_store, full_store, report_k):
    """The spectrum.csv table from rows.zarr and full.zarr (one row per layer x head, plus pooled)."""
    import pandas as pd

    from .store import open_group

    recs = []

    def add(analysis, variant, attrs, eig, total, n_samples, head_labels, dim):
        """eig (L, len(head_labels), r), total (L, len(head_labels)), n_samples an int."""
        ev = explained_variance(eig, total)
        ks = {p: k_at(ev, p) for p in P_LEVELS}
        bounded = is_bounded(ks[0.90], n_samples, dim)
        for li, layer in enumerate(attrs["layers"]):
            for hi, head in enumerate(head_labels):
                rec = {"model": attrs["model"], "view": attrs["view"], "analysis": analysis, "variant": variant,
                       "layer": layer, "head": head, "d": dim, "n_samples": n_samples,
                       "total_variance": float(total[li, hi]),
                       **{f"k{round(p * 100)}": int(ks[p][li, hi]) for p in P_LEVELS}}
                for k in report_k:
                    rec[f"ev_at_{k}"] = float(ev[li, hi, min(k, ev.shape[-1]) - 1])
                rec["bounded"] = bool(bounded[li, hi])
                recs.append(rec)

    rows = open_group(rows_store)
    ra = rows.attrs.asdict()
    d = int(ra["d"])
    heads = list(range(int(ra["heads"])))
    for v in ra["variants"]:
        g = rows[v]
        eig = g["eigenvalues"][:]
        count = int(g["count"][0, 0])
        add("rows", v, ra, eig, eig.sum(-1), count, heads, d)
        peig = g["pooled"]["eigenvalues"][:][:, None, :]
        add("rows", v, ra, peig, peig.sum(-1), int(g["pooled"]["count"][0]), ["pooled"], d)
    full = open_group(full_store)
    fa = full.attrs.asdict()
    for v in fa["variants"]:
        g = full if v == "raw" else full[v]
        ga = g.attrs.asdict()
        add("full", v, fa, g["eigenvalues"][:], g["total_variance"][:], int(ga["n_samples"]), heads, int(ga["dim"]))
    return pd.DataFrame.from_records(recs)
