"""The eigen stage's stores (docs/data-contract.md): rows.zarr, halves.zarr and full.zarr are
written here, read back by :class:`RowStats`, and summarised as spectrum.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd

from eigenattn.capture.masks import select_visible
from eigenattn.capture.recompute import open_token_shard
from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.full_spectra import full_spectra
from eigenattn.spectra.moments import check_variant
from eigenattn.spectra.rows import (
    P_LEVELS,
    constant_alignment,
    explained_variance,
    halves_spectrum,
    heldout_ev_rows,
    is_bounded,
    k_at,
    row_spectrum,
)
from eigenattn.spectra.streamed import merge_moment_files
from eigenattn.storage.score_source import open_score_source
from eigenattn.storage.store import new_store, open_scores, open_store, write_arrays


def _store_attrs(attrs: dict, view: str, causal: bool, n_seq: int, extra: dict) -> dict:
    n = attrs["seq_len"]
    qs, ks = view_slices(view, n, causal)
    return {
        "model": attrs["model"],
        "view": view,
        "causal": causal,
        "layers": attrs["layers"],
        "heads": attrs["heads"],
        "n_layers_total": attrs.get("n_layers_total"),
        "seq_len": n,
        "query_range": [qs.start, qs.stop],
        "key_range": [ks.start, ks.stop],
        "d": ks.stop - ks.start,
        "n_sequences": n_seq,
        "corpus": attrs.get("corpus"),
        "seed": attrs.get("seed"),
        "split": "fit",
        "scores_dtype": attrs.get("dtype"),
        "skipped_layers": attrs.get("skipped_layers", []),
        **extra,
    }


def _open_fit(shards, view: str, variants, expect: dict | None, opener=open_scores):
    """Open the fit shards and fail early on an undefined view or unknown variant."""
    scores, attrs = opener(shards, expect)
    causal = bool(attrs["causal"])
    view_slices(view, attrs["seq_len"], causal)
    for v in variants:
        check_variant(v)
    scores, attrs = select_visible(scores, attrs, view)  # layers whose mask hides part of the view are skipped
    return scores, attrs, causal


HEAD_DIMS = {
    "mean": ["layer", "head", "key"],
    "eigenvalues": ["layer", "head", "component"],
    "eigenvectors": ["layer", "head", "key", "component"],
    "count": ["layer", "head"],
}
ROW_DIMS = {**HEAD_DIMS, "pooled": {k: [d for d in v if d != "head"] for k, v in HEAD_DIMS.items()}}
FULL_DIMS = {
    "eigenvalues": ["layer", "head", "component"],
    "total_variance": ["layer", "head"],
    "ev_heldout": ["layer", "head", "k"],
    "half_eigenvalues": ["half", "layer", "head", "half_component"],
    "half_total_variance": ["half", "layer", "head"],
}


def _coords(attrs: dict, d: int | None = None) -> dict:
    """Coordinate arrays of the eigen stores: the model's layer indices, heads and key positions."""
    out = {
        "layer": (np.asarray(attrs["layers"], dtype=np.int64), "layer"),
        "head": (np.arange(int(attrs["heads"]), dtype=np.int64), "head"),
    }
    if d is not None:
        out["key"] = (np.arange(d, dtype=np.int64), "key")
    return out


def run_rows(
    shards,
    out_path,
    view: str,
    variants,
    split_every: int,
    halves_path=None,
    expect: dict | None = None,
    vectors: str = "auto",
) -> dict:
    """Row analysis of all fit shards into rows.zarr (groups per variant, with pooled/ subgroups).

    With ``halves_path``, the spectra of the two halves of the fit sequences go to a second store
    (groups {variant}/{a,b}/ shaped like rows.zarr's), read by the overlap stage.
    """
    scores, attrs, causal = _open_fit(shards, view, variants, expect)
    results = {v: row_spectrum(scores, view, v, causal, split_every, halves=halves_path is not None) for v in variants}
    write_rows(results, attrs, view, causal, int(scores.shape[0]), variants, out_path, halves_path, vectors=vectors)
    return results


def run_rows_streamed(
    moment_paths, out_path, view: str, variants, halves_path, expect: dict | None = None, vectors: str = "auto"
) -> dict:
    """rows.zarr and halves.zarr from streamed moments (every layer group and sequence shard of the
    fit split, :mod:`eigenattn.spectra.streamed`) instead of score stores: the same stores, the
    same spectra code; ``route`` says which way they were made."""
    for v in variants:
        check_variant(v)
    halves, attrs = merge_moment_files(moment_paths, view, variants, expect)
    causal = bool(attrs["causal"])
    view_slices(view, attrs["seq_len"], causal)
    idx, attrs = select_visible(np.arange(len(attrs["layers"]))[None], attrs, view)
    idx = idx[0]
    results = {v: halves_spectrum(halves[v]["a"][idx], halves[v]["b"][idx], attrs["split_sequence"]) for v in variants}
    write_rows(
        results,
        attrs,
        view,
        causal,
        int(attrs["n_sequences"]),
        variants,
        out_path,
        halves_path,
        route="streamed",
        vectors=vectors,
    )
    return results


# above this dimension, eigenvectors are stored as float32 unless eigen.vector_dtype says otherwise
VECTOR_FLOAT64_MAX_D = 512


def vector_dtype(choice: str, d: int) -> np.dtype:
    """The dtype eigen.vector_dtype gives the eigenvectors of a view of dimension ``d``: auto is
    float64 up to d = 512 and float32 above (a float64 d x d set per head and variant is what fills
    the disk at long n); an explicit float32 or float64 is kept."""
    if choice == "auto":
        choice = "float64" if d <= VECTOR_FLOAT64_MAX_D else "float32"
    if choice not in ("float32", "float64"):
        raise ConfigError("eigen.vector_dtype", f"unknown dtype {choice!r}", "use auto, float32 or float64")
    return np.dtype(choice)


def _f64(array) -> np.ndarray:
    """A stored eigenvector array read as float64 (eigen.vector_dtype may have stored float32)."""
    return np.asarray(array[...], dtype=np.float64)


def _cast_vectors(stats: dict, dtype: np.dtype) -> dict:
    """A heads/pooled statistics dict with its eigenvectors in ``dtype`` (the rest as computed)."""
    return {k: (np.asarray(v).astype(dtype, copy=False) if k == "eigenvectors" else v) for k, v in stats.items()}


def write_rows(
    results, attrs, view, causal, n_seq, variants, out_path, halves_path=None, route="stored", vectors="auto"
) -> None:
    """Write the row spectra of every variant into rows.zarr (and their halves into halves.zarr).

    ``vectors`` is eigen.vector_dtype (:func:`vector_dtype`); the stores' attrs record the dtype used.
    """
    d = results[variants[0]]["heads"]["mean"].shape[-1]
    coords = _coords(attrs, d)
    vdt = vector_dtype(vectors, d)
    if halves_path is not None:
        with new_store(halves_path) as root:
            for v, res in results.items():
                for half in ("a", "b"):
                    write_arrays(
                        root.require_group(f"{v}/{half}"),
                        {
                            **_cast_vectors(res["halves"][half]["heads"], vdt),
                            "pooled": _cast_vectors(res["halves"][half]["pooled"], vdt),
                        },
                        ROW_DIMS,
                        coords=coords,
                    )
            split = results[variants[0]]["halves"]["split_sequence"]
            root.attrs.update(
                _store_attrs(
                    attrs,
                    view,
                    causal,
                    n_seq,
                    {
                        "analysis": "rows_halves",
                        "route": route,
                        "vector_dtype": vdt.name,
                        "variants": list(variants),
                        "split_sequence": split,
                        "halves": {"a": [0, split], "b": [split, int(n_seq)]},
                        "definition": "row spectra (as rows.zarr) of the first (a) and second (b) half of the fit "
                        "sequences in passage_id order",
                    },
                )
            )
    with new_store(out_path) as root:
        for v, res in results.items():
            write_arrays(
                root.require_group(v),
                {**_cast_vectors(res["heads"], vdt), "pooled": _cast_vectors(res["pooled"], vdt)},
                ROW_DIMS,
                coords=coords,
            )
        root.attrs.update(
            _store_attrs(
                attrs,
                view,
                causal,
                n_seq,
                {
                    "analysis": "rows",
                    "route": route,
                    "vector_dtype": vdt.name,
                    "variants": list(variants),
                    "definition": "covariance of score rows S[i, keys] over queries i in the view and fit sequences; "
                    "eigenvalues descending, eigenvectors are columns; pooled/ merges the heads of a layer",
                },
            )
        )


def run_full(
    shards,
    out_path,
    view: str,
    variants,
    memory_mb: float,
    expect: dict | None = None,
    *,
    rank: int | None,
    seed: int,
    workers: int = 1,
    route: str = "auto",
) -> dict:
    """Full-matrix analysis into full.zarr: the `raw` variant at the root, others in subgroups.
    ``memory_mb`` bounds what the tasks hold, ``workers`` tasks run at once, ``route`` and ``rank``
    choose how (see eigenattn.spectra.full_spectra)."""
    scores, attrs, causal = _open_fit(
        shards, view, variants, expect, opener=lambda s, e: open_score_source(s, e, recompute=open_token_shard)
    )
    results = full_spectra(
        scores, view, variants, causal, memory_mb, workers=workers, route=route, rank=rank, seed=seed
    )
    with new_store(out_path) as root:
        for v, res in results.items():
            g = root if v == "raw" else root.require_group(v)
            write_arrays(
                g,
                {k: res[k] for k in FULL_DIMS},
                FULL_DIMS,
                {
                    "n_samples": res["n_samples"],
                    "dim": res["dim"],
                    "variant": v,
                    "split_sequence": res["split_sequence"],
                    "route": res["route"],
                    "rank": res["rank"],
                },
                coords=_coords(attrs),
            )
        first = results[variants[0]]
        root.attrs.update(
            _store_attrs(
                attrs,
                view,
                causal,
                scores.shape[0],
                {
                    "analysis": "full",
                    "variants": list(variants),
                    "route": first["route"],
                    "rank": first["rank"],
                    "definition": "eigenvalues of the covariance of vectorised view blocks (one sample per sequence), "
                    "from the D x D scatter (route covariance) or the centred N x N Gram (route gram), or "
                    "the top `rank` components by randomised SVD (route randomized); total_variance = sum "
                    "of per-coordinate variances (exact); ev_heldout[k-1] = share of one half's variance "
                    "inside the other half's top-k principal directions, averaged over both directions "
                    "(halves split at split_sequence); half_eigenvalues: each half's own spectrum "
                    "(half 0 = a, before split_sequence; 1 = b)",
                },
            )
        )
    return results


def spectrum_table(rows_store, halves_store, full_store, report_k):
    """The spectrum.csv table (one row per layer × head, plus pooled) from rows.zarr, halves.zarr
    and full.zarr (``None``: rows only): k_p in-sample and held-out (``k90_cv``: smallest k whose
    half-sample subspace explains p of the other half, empty when not reached), bounded flags per
    level, the split-half spread of full-matrix k_p (``k90_split_spread``: |k_p of half a − k_p of
    half b|), EV(k)."""
    recs = []

    def add(analysis, variant, attrs, eig, total, n_samples, head_labels, dim, ev_cv, u1=None, halves=None):
        """eig (L, len(head_labels), r), total and u1 (L, len(head_labels)), ev_cv (L, heads, r_cv);
        halves: (eigenvalues (2, L, H, r), totals (2, L, H)) of each half's own spectrum."""
        ev = explained_variance(eig, total)
        ks = {p: k_at(ev, p) for p in P_LEVELS}
        spread = (
            None
            if halves is None
            else {p: np.abs(np.subtract(*k_at(explained_variance(*halves), p))) for p in P_LEVELS}
        )
        cv = {p: np.where(ev_cv[..., -1] >= p - 1e-12, k_at(ev_cv, p), -1) for p in P_LEVELS}
        bounded = {p: is_bounded(ev_cv, p, n_samples, dim, ev) for p in P_LEVELS}
        for li, layer in enumerate(attrs["layers"]):
            for hi, head in enumerate(head_labels):
                rec = {
                    "model": attrs["model"],
                    "view": attrs["view"],
                    "analysis": analysis,
                    "variant": variant,
                    "layer": layer,
                    "head": head,
                    "d": dim,
                    "n_samples": n_samples,
                    "total_variance": float(total[li, hi]),
                }
                for p in P_LEVELS:
                    name = f"k{round(p * 100)}"
                    rec[name] = int(ks[p][li, hi])
                    rec[f"{name}_cv"] = int(cv[p][li, hi]) if cv[p][li, hi] > 0 else pd.NA
                for k in report_k:  # EV(k) is undefined past the last component: empty, never clamped
                    rec[f"ev_at_{k}"] = float(ev[li, hi, k - 1]) if k <= ev.shape[-1] else np.nan
                for p in P_LEVELS:
                    rec[f"bounded_k{round(p * 100)}"] = bool(bounded[p][li, hi])
                for p in P_LEVELS:
                    rec[f"k{round(p * 100)}_split_spread"] = pd.NA if spread is None else int(spread[p][li, hi])
                rec["u1_constant"] = float(u1[li, hi]) if u1 is not None else np.nan
                recs.append(rec)

    rows, halves = open_store(rows_store), open_store(halves_store)
    ra = rows.attrs.asdict()
    d = int(ra["d"])
    heads = list(range(int(ra["heads"])))
    for v in ra["variants"]:
        for scope, labels, sl in (("", heads, np.s_[...]), ("pooled/", ["pooled"], np.s_[:, None])):
            g = rows[f"{v}/{scope}" if scope else v]
            ha, hb = halves[f"{v}/a/{scope}" if scope else f"{v}/a"], halves[f"{v}/b/{scope}" if scope else f"{v}/b"]
            eig = g["eigenvalues"][:][sl]
            ev_cv = heldout_ev_rows(
                _f64(ha["eigenvectors"]), ha["eigenvalues"][:], _f64(hb["eigenvectors"]), hb["eigenvalues"][:]
            )[sl]
            count = int(np.asarray(g["count"][:]).flat[0])
            u1 = constant_alignment(_f64(g["eigenvectors"]))[sl]
            add("rows", v, ra, eig, eig.sum(-1), count, labels, d, ev_cv, u1)
    full = open_store(full_store) if full_store is not None else None
    for v in full.attrs["variants"] if full is not None else ():
        g = full if v == "raw" else full[v]
        ga = g.attrs.asdict()
        add(
            "full",
            v,
            full.attrs.asdict(),
            g["eigenvalues"][:],
            g["total_variance"][:],
            int(ga["n_samples"]),
            heads,
            int(ga["dim"]),
            g["ev_heldout"][:],
            halves=(g["half_eigenvalues"][:], g["half_total_variance"][:]),
        )
    df = pd.DataFrame.from_records(recs)
    for p in P_LEVELS:
        for col in (f"k{round(p * 100)}_cv", f"k{round(p * 100)}_split_spread"):
            df[col] = df[col].astype("Int64")
    return df


class RowStats:
    """The fit-split statistics of one rows.zarr (variant ``raw``): μ, U, Λ per layer and head."""

    def __init__(self, path, variant: str = "raw"):
        g = open_store(path)
        a = g.attrs.asdict()
        if variant not in g:
            raise InputError(
                path, f"has no '{variant}' group", f"add '{variant}' to eigen.variants and re-run the eigen stage"
            )
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
        self.mean, self.eigenvalues, self.eigenvectors = v["mean"][:], v["eigenvalues"][:], _f64(v["eigenvectors"])
        p = v["pooled"]
        self.pooled = (p["mean"][:], p["eigenvalues"][:], _f64(p["eigenvectors"]))

    def check_matches(self, seq_len: int, what: str) -> None:
        if int(seq_len) != self.seq_len:
            raise InputError(
                self.path,
                f"statistics were fitted at seq_len {self.seq_len}, but {what} has seq_len {seq_len}",
                "re-run the eigen stage with the same sampling.seq_len",
            )

    def layer_pos(self, layer: int) -> int:
        if layer not in self.layers:
            raise InputError(
                self.path,
                f"layer {layer} was not analysed (analysed: {self.layers})",
                f"add it to models.{self.model}.layers",
            )
        return self.layers.index(layer)

    def head_stats(self, layer: int):
        """(mean, U, lam) of every head of a layer: (H, d), (H, d, d), (H, d)."""
        i = self.layer_pos(layer)
        return self.mean[i], self.eigenvectors[i], self.eigenvalues[i]

    def pooled_stats(self, layer: int):
        i = self.layer_pos(layer)
        return self.pooled[0][i], self.pooled[2][i], self.pooled[1][i]
