"""Subspace overlap across heads, layers and models (METHOD.md §5).

For analyses a, b of equal dimension d with top-k eigenvectors U_a, U_b (d x k):

    overlap_k(a, b)   = ||U_a^T U_b||_F^2 / k               in [0, 1]; mean cos^2 of the principal angles
    captured_k(a -> b) = tr(U_a^T C_b U_a) / tr(C_b)         share of b's variance inside a's subspace
    random baseline    = k / d

With C_b = V_b diag(l_b) V_b^T (all d eigenpairs of b): captured_k(a -> b) =
sum_j l_bj ||U_a^T v_bj||^2 / sum_j l_bj, so both quantities come from one product U_a^T V_b.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

SCOPES = ("same_layer_other_heads", "adjacent_layers", "all_layer_pairs", "cross_model", "split_half")


def check_ks(ks, d: int, key: str = "overlap.k") -> list[int]:
    ks = [int(k) for k in ks]
    bad = [k for k in ks if k < 1 or k > d]
    if bad:
        raise ConfigError(key, f"k = {bad} outside 1..d = {d} (d is the row dimension of the view)",
                          f"use values between 1 and {d}")
    return ks


def overlap_and_captured(Ua: np.ndarray, Vb: np.ndarray, lam_b: np.ndarray, ks, block: int = 32):
    """All-pairs overlap and captured share.

    Ua: (A, d, d) eigenvectors of the A analyses on the 'a' side (columns, descending);
    Vb, lam_b: (B, d, d) and (B, d) eigenvectors and eigenvalues of the B analyses on the 'b' side.
    Returns (overlap, captured), each (K, A, B). Rows of a are processed in blocks to bound memory.
    """
    ks = list(ks)
    kmax = max(ks)
    A, d, _ = Ua.shape
    B = Vb.shape[0]
    tot_b = lam_b.sum(axis=-1)
    tot_b = np.where(tot_b > 0, tot_b, 1.0)
    ov = np.empty((len(ks), A, B))
    cap = np.empty((len(ks), A, B))
    for s in range(0, A, block):
        Uk = Ua[s:s + block, :, :kmax]  # (a, d, kmax)
        # G[a, b, i, j] = u_ai . v_bj for the top-kmax columns of a and all d columns of b
        G2 = np.einsum("adi,bdj->abij", Uk, Vb, optimize=True) ** 2
        for ki, k in enumerate(ks):
            ov[ki, s:s + block] = G2[:, :, :k, :k].sum(axis=(2, 3)) / k
            cap[ki, s:s + block] = (G2[:, :, :k, :] * lam_b[None, :, None, :]).sum(axis=(2, 3)) / tot_b[None]
    return np.clip(ov, 0.0, 1.0), np.clip(cap, 0.0, 1.0)


def paired_overlap(Ua: np.ndarray, Ub: np.ndarray, ks) -> np.ndarray:
    """overlap_k(a_i, b_i) for aligned stacks (M, d, d) -> (K, M). Used for split halves."""
    out = []
    for k in ks:
        G = np.einsum("mdi,mdj->mij", Ua[:, :, :k], Ub[:, :, :k])
        out.append((G ** 2).sum(axis=(1, 2)) / k)
    return np.clip(np.array(out), 0.0, 1.0)


def flatten_heads(x: np.ndarray) -> np.ndarray:
    """(L, H, ...) -> (L*H, ...), layer-major (index = layer_pos * H + head)."""
    return x.reshape((-1,) + x.shape[2:])


def _rows_group(store, variant):
    from .store import open_group

    g = open_group(store)
    if variant not in g:
        raise ConfigError("eigen.variants", f"variant '{variant}' not in {store}", "re-run the eigen stage")
    return g, g[variant]


def within_model(rows_store, halves_store, variant: str, ks) -> tuple[dict, dict]:
    """Overlap arrays for one model/view/variant. Returns (arrays, attrs)."""
    g, v = _rows_group(rows_store, variant)
    a = g.attrs.asdict()
    ks = check_ks(ks, int(a["d"]))
    U = flatten_heads(v["eigenvectors"][:])
    lam = flatten_heads(v["eigenvalues"][:])
    ov, cap = overlap_and_captured(U, U, lam, ks)
    Up, lamp = v["pooled/eigenvectors"][:], v["pooled/eigenvalues"][:]
    pov, pcap = overlap_and_captured(Up, Up, lamp, ks)
    h = _rows_group(halves_store, variant)[1]
    sh = paired_overlap(flatten_heads(h["a/eigenvectors"][:]), flatten_heads(h["b/eigenvectors"][:]), ks)
    psh = paired_overlap(h["a/pooled/eigenvectors"][:], h["b/pooled/eigenvectors"][:], ks)
    d = int(a["d"])
    arrays = {"overlap": ov, "captured": cap, "random_baseline": np.array(ks, dtype=np.float64) / d,
              "split_half": sh, "k": np.array(ks, dtype=np.int64),
              "pooled": {"overlap": pov, "captured": pcap, "split_half": psh}}
    attrs = {"model": a["model"], "view": a["view"], "variant": variant, "d": d, "layers": a["layers"],
             "heads": a["heads"], "k": ks,
             "axes": {"overlap": ["k", "a (layer_pos*heads + head)", "b"], "captured": ["k", "a", "b (a -> b)"],
                      "split_half": ["k", "head index"], "pooled/overlap": ["k", "layer_pos", "layer_pos"]}}
    return arrays, attrs


def cross_model(rows_a, rows_b, variant: str, ks) -> tuple[dict, dict]:
    ga, va = _rows_group(rows_a, variant)
    gb, vb = _rows_group(rows_b, variant)
    aa, ab = ga.attrs.asdict(), gb.attrs.asdict()
    if int(aa["d"]) != int(ab["d"]):
        raise ConfigError("overlap.cross_pairs", f"models '{aa['model']}' (d={aa['d']}) and '{ab['model']}' "
                          f"(d={ab['d']}) have different row dimensions in view '{aa['view']}'",
                          "compare models analysed with the same seq_len")
    ks = check_ks(ks, int(aa["d"]))
    ov, cap = overlap_and_captured(flatten_heads(va["eigenvectors"][:]), flatten_heads(vb["eigenvectors"][:]),
                                   flatten_heads(vb["eigenvalues"][:]), ks)
    pov, pcap = overlap_and_captured(va["pooled/eigenvectors"][:], vb["pooled/eigenvectors"][:],
                                     vb["pooled/eigenvalues"][:], ks)
    arrays = {"overlap": ov, "captured": cap, "random_baseline": np.array(ks, dtype=np.float64) / int(aa["d"]),
              "k": np.array(ks, dtype=np.int64), "pooled": {"overlap": pov, "captured": pcap}}
    attrs = {"model_a": aa["model"], "model_b": ab["model"], "view": aa["view"], "variant": variant,
             "d": int(aa["d"]), "layers_a": aa["layers"], "layers_b": ab["layers"], "heads_a": aa["heads"],
             "heads_b": ab["heads"], "k": ks}
    return arrays, attrs


def _stats(values: np.ndarray, random: float, ceiling: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(ceiling, dtype=np.float64)
    return {"n_pairs": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "median_ratio_random": float(np.median(v / random)),
            "median_ratio_split_half": float(np.median(v / np.where(c > 0, c, np.nan)))}


def scope_masks(L: int, H: int) -> dict[str, np.ndarray]:
    """Boolean (L*H, L*H) masks of the within-model scopes (upper triangle: each pair once).

    Adjacent layers are consecutive positions in the captured layer list.
    """
    layer = np.repeat(np.arange(L), H)
    dl = np.abs(layer[:, None] - layer[None, :])
    upper = np.triu(np.ones((L * H, L * H), dtype=bool), k=1)
    return {"same_layer_other_heads": upper & (dl == 0), "adjacent_layers": upper & (dl == 1),
            "all_layer_pairs": upper & (dl > 0)}


def summary_rows(arrays: dict, attrs: dict, split_half_a: np.ndarray, split_half_b: np.ndarray | None = None):
    """Summary records for one within-model (split_half_b None) or cross-model overlap result.

    The split-half ceiling of a pair is the geometric mean of the two heads' split-half overlaps.
    """
    recs = []
    cross = "model_b" in attrs
    for ki, k in enumerate(attrs["k"]):
        ov = arrays["overlap"][ki]
        rnd = float(arrays["random_baseline"][ki])
        sha = split_half_a[ki]
        shb = sha if split_half_b is None else split_half_b[ki]
        ceil = np.sqrt(np.clip(np.outer(sha, shb), 0, None))
        base = {"model_a": attrs.get("model_a", attrs.get("model")), "model_b": attrs.get("model_b", attrs.get("model")),
                "view": attrs["view"], "variant": attrs["variant"], "k": int(k)}
        if cross:
            recs.append({**base, "scope": "cross_model", **_stats(ov.ravel(), rnd, ceil.ravel())})
            continue
        L, H = len(attrs["layers"]), int(attrs["heads"])
        for scope, m in scope_masks(L, H).items():
            if m.any():
                recs.append({**base, "scope": scope, **_stats(ov[m], rnd, ceil[m])})
        recs.append({**base, "scope": "split_half", **_stats(sha, rnd, sha)})
    return recs


def write_overlap(path, arrays: dict, attrs: dict) -> None:
    import zarr

    from . import __version__
    from .store import atomic_store, write_arrays

    with atomic_store(path) as tmp:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        write_arrays(root, arrays, {**attrs, "eigenattn_version": __version__, "complete": True})


def summarise(within_stores, cross_stores):
    """The summary table (METHOD.md §5) from the within- and cross-model overlap stores."""
    import pandas as pd

    from .store import open_group

    split_half = {}
    recs = []
    for p in within_stores:
        g = open_group(p)
        a = g.attrs.asdict()
        split_half[(a["model"], a["view"], a["variant"])] = g["split_half"][:]
        recs += summary_rows({k: g[k][:] for k in ("overlap", "random_baseline")}, a, g["split_half"][:])
    for p in cross_stores:
        g = open_group(p)
        a = g.attrs.asdict()
        sha = split_half[(a["model_a"], a["view"], a["variant"])]
        shb = split_half[(a["model_b"], a["view"], a["variant"])]
        recs += summary_rows({k: g[k][:] for k in ("overlap", "random_baseline")}, a, sha, shb)
    cols = ["model_a", "model_b", "view", "variant", "k", "scope", "n_pairs", "mean", "median", "p10", "p90",
            "median_ratio_random", "median_ratio_split_half"]
    return pd.DataFrame.from_records(recs, columns=cols)
