"""Subspace overlap across heads, layers and models (docs/method.md §5).

For analyses a, b of equal dimension d with top-k eigenvectors U_a, U_b (d x k):

    overlap_k(a, b)    = ||U_a^T U_b||_F^2 / k               in [0, 1]; mean cos^2 of the principal angles
    captured_k(a -> b) = tr(U_a^T C_b U_a) / tr(C_b)         share of b's variance inside a's subspace
    random baseline    = k / d  (k / (d - 1) for row_centered rows, which live in d - 1 dimensions)

With C_b = V_b diag(l_b) V_b^T (all d eigenpairs of b): captured_k(a -> b) =
sum_j l_bj ||U_a^T v_bj||^2 / sum_j l_bj, so both quantities come from one product U_a^T V_b.

Like with like: every pair comparison that is set against the split-half ceiling is itself made
between half-sample estimates (half a of head i against half b of head j, symmetrised), since the
ceiling (half a against half b of the same head) is limited by the noise of N/2-sample estimates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.rows import constant_alignment
from eigenattn.storage.store import new_store, open_store, write_arrays


def check_ks(ks, d: int) -> list[int]:
    ks = [int(k) for k in ks]
    bad = [k for k in ks if k < 1 or k > d]
    if bad:
        raise ConfigError(
            "overlap.k",
            f"k = {bad} outside 1..d = {d} (d is the row dimension of the view)",
            f"list subspace sizes between 1 and {d}",
        )
    return ks


def random_baseline(ks, d: int, variant: str) -> np.ndarray:
    """Expected overlap_k (and captured_k of isotropic data) of a uniformly random k-subspace.

    Row-centred rows are orthogonal to the constant vector, so their subspaces are drawn from the
    d − 1 dimensional complement.
    """
    dim = d - 1 if variant == "row_centered" else d
    return np.minimum(np.asarray(ks, dtype=np.float64) / dim, 1.0)


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
        Uk = Ua[s : s + block, :, :kmax]  # (a, d, kmax)
        # G[a, b, i, j] = u_ai . v_bj for the top-kmax columns of a and all d columns of b
        G2 = np.einsum("adi,bdj->abij", Uk, Vb, optimize=True) ** 2
        for ki, k in enumerate(ks):
            ov[ki, s : s + block] = G2[:, :, :k, :k].sum(axis=(2, 3)) / k
            cap[ki, s : s + block] = (G2[:, :, :k, :] * lam_b[None, :, None, :]).sum(axis=(2, 3)) / tot_b[None]
    return np.clip(ov, 0.0, 1.0), np.clip(cap, 0.0, 1.0)


def half_pairs(a_halves, b_halves, ks):
    """Overlap and captured share between half-sample estimates, symmetrised over the halves.

    ``a_halves`` = ((U, lam) of half a, (U, lam) of half b) for the A analyses on one side, and
    likewise ``b_halves`` for the B analyses on the other side. Entry [k, i, j] compares half a of
    i with half b of j and half b of i with half a of j, and averages the two; so each value uses
    every sequence once and matches the split-half ceiling (i against itself) in sample size.
    """
    (Ua1, _), (Ua2, _) = a_halves
    (Ub1, lb1), (Ub2, lb2) = b_halves
    ov12, cap12 = overlap_and_captured(Ua1, Ub2, lb2, ks)
    ov21, cap21 = overlap_and_captured(Ua2, Ub1, lb1, ks)
    return 0.5 * (ov12 + ov21), 0.5 * (cap12 + cap21)


def flatten_heads(x: np.ndarray) -> np.ndarray:
    """(L, H, ...) -> (L*H, ...), layer-major (index = layer_pos * H + head)."""
    return x.reshape((-1,) + x.shape[2:])


def _open(store, variant):
    g = open_store(store)
    if variant not in g:
        raise InputError(
            store, f"has no '{variant}' group", f"add '{variant}' to eigen.variants and re-run the eigen stage"
        )
    return g.attrs.asdict(), g[variant]


def _heads(group, prefix=""):
    """(U, lam) of every head (flattened, layer-major) and of every layer's pooled analysis."""
    g = group[prefix] if prefix else group
    return (
        (flatten_heads(np.asarray(g["eigenvectors"][:], np.float64)), flatten_heads(g["eigenvalues"][:])),
        (np.asarray(g["pooled/eigenvectors"][:], np.float64), g["pooled/eigenvalues"][:]),
    )


def _side(rows_store, halves_store, variant):
    attrs, v = _open(rows_store, variant)
    _, h = _open(halves_store, variant)
    heads, pooled = _heads(v)
    (ha, pa), (hb, pb) = _heads(h, "a"), _heads(h, "b")
    return attrs, heads, pooled, (ha, hb), (pa, pb)


def _comparison(side_a, side_b, ks):
    """Full-sample and half-sample overlap and captured share, per head and per pooled layer."""
    _, heads_a, pooled_a, halves_a, phalves_a = side_a
    _, heads_b, pooled_b, halves_b, phalves_b = side_b
    ov, cap = overlap_and_captured(heads_a[0], heads_b[0], heads_b[1], ks)
    hov, hcap = half_pairs(halves_a, halves_b, ks)
    pov, pcap = overlap_and_captured(pooled_a[0], pooled_b[0], pooled_b[1], ks)
    phov, phcap = half_pairs(phalves_a, phalves_b, ks)
    return {
        "overlap": ov,
        "captured": cap,
        "half_overlap": hov,
        "half_captured": hcap,
        "pooled": {"overlap": pov, "captured": pcap, "half_overlap": phov, "half_captured": phcap},
    }


def _ceiling(side, ks):
    """Split-half ceiling of each head (and pooled layer): half a against half b of itself."""
    _, _, _, (ha, hb), (pa, pb) = side
    hov, hcap = half_pairs((ha, hb), (ha, hb), ks)
    pov, pcap = half_pairs((pa, pb), (pa, pb), ks)
    diag = lambda x: np.diagonal(x, axis1=1, axis2=2).copy()  # noqa: E731
    return diag(hov), diag(hcap), diag(pov), diag(pcap)


AXES = "a and b index heads layer-major (layer_pos * heads + head); captured[k, a, b] is captured_k(a -> b)"


def within_model(rows_store, halves_store, variant: str, ks) -> tuple[dict, dict]:
    """Overlap arrays for one model/view/variant. Returns (arrays, attrs)."""
    side = _side(rows_store, halves_store, variant)
    a = side[0]
    d = int(a["d"])
    ks = check_ks(ks, d)
    arrays = _comparison(side, side, ks)
    sh, shc, psh, pshc = _ceiling(side, ks)
    arrays.update(
        {
            "split_half": sh,
            "split_half_captured": shc,
            "random_baseline": random_baseline(ks, d, variant),
            "k": np.array(ks, dtype=np.int64),
            "u1_constant": constant_alignment(side[1][0]),
        }
    )
    arrays["pooled"].update({"split_half": psh, "split_half_captured": pshc})
    attrs = {
        "model": a["model"],
        "view": a["view"],
        "variant": variant,
        "d": d,
        "layers": a["layers"],
        "heads": a["heads"],
        "k": ks,
        "n_sequences": a.get("n_sequences"),
        "axes": AXES,
    }
    return arrays, attrs


def cross_model(rows_a, halves_a, rows_b, halves_b, variant: str, ks) -> tuple[dict, dict]:
    side_a = _side(rows_a, halves_a, variant)
    side_b = _side(rows_b, halves_b, variant)
    aa, ab = side_a[0], side_b[0]
    if int(aa["d"]) != int(ab["d"]):
        raise InputError(
            f"{rows_a}, {rows_b}",
            f"models '{aa['model']}' (d={aa['d']}) and '{ab['model']}' "
            f"(d={ab['d']}) have different row dimensions in view '{aa['view']}'",
            "compare models analysed with the same seq_len",
        )
    d = int(aa["d"])
    ks = check_ks(ks, d)
    arrays = _comparison(side_a, side_b, ks)
    sha, shca, _, _ = _ceiling(side_a, ks)
    shb, shcb, _, _ = _ceiling(side_b, ks)
    arrays.update(
        {
            "split_half_a": sha,
            "split_half_b": shb,
            "split_half_captured_a": shca,
            "split_half_captured_b": shcb,
            "random_baseline": random_baseline(ks, d, variant),
            "k": np.array(ks, dtype=np.int64),
            "u1_constant_a": constant_alignment(side_a[1][0]),
            "u1_constant_b": constant_alignment(side_b[1][0]),
        }
    )
    attrs = {
        "model_a": aa["model"],
        "model_b": ab["model"],
        "view": aa["view"],
        "variant": variant,
        "d": d,
        "layers_a": aa["layers"],
        "layers_b": ab["layers"],
        "heads_a": aa["heads"],
        "heads_b": ab["heads"],
        "k": ks,
        "axes": AXES,
        "caveat": "keys are compared by position: the two models tokenise the same passages differently, "
        "so key j is not the same token in both",
    }
    return arrays, attrs


def scope_masks(L: int, H: int) -> dict[str, np.ndarray]:
    """Boolean (L*H, L*H) masks of the within-model scopes (upper triangle: each pair once).

    Adjacent layers are consecutive positions in the captured layer list.
    """
    layer = np.repeat(np.arange(L), H)
    dl = np.abs(layer[:, None] - layer[None, :])
    upper = np.triu(np.ones((L * H, L * H), dtype=bool), k=1)
    return {
        "same_layer_other_heads": upper & (dl == 0),
        "adjacent_layers": upper & (dl == 1),
        "all_layer_pairs": upper & (dl > 0),
    }


SUMMARY_COLUMNS = [
    "model_a",
    "model_b",
    "view",
    "variant",
    "d",
    "k",
    "quantity",
    "scope",
    "n_pairs",
    "mean",
    "median",
    "p10",
    "p90",
    "random",
    "median_ratio_random",
    "half_median",
    "ceiling_median",
    "median_ratio_ceiling",
    "u1_constant_median",
]


def _stats(values, random: float, half=None, ceiling=None) -> dict:
    v = np.asarray(values, dtype=np.float64)
    out = {
        "n_pairs": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "random": random,
        "median_ratio_random": float(np.median(v)) / random,
    }
    if half is not None:
        c = np.asarray(ceiling, dtype=np.float64)
        out.update(
            {
                "half_median": float(np.median(half)),
                "ceiling_median": float(np.median(c)),
                "median_ratio_ceiling": float(np.nanmedian(np.asarray(half) / np.where(c > 0, c, np.nan))),
            }
        )
    return out


def summary_rows(arrays: dict, attrs: dict) -> list[dict]:
    """Summary records of one within-model or cross-model overlap result.

    ``overlap`` pairs are unordered (each once); ``captured`` pairs are ordered (a -> b, a ≠ b).
    Each pair's half-sample value is compared with its ceiling, the geometric mean of the two
    analyses' split-half values (of the same quantity).
    """
    recs = []
    cross = "model_b" in attrs
    base = {
        "model_a": attrs.get("model_a", attrs.get("model")),
        "model_b": attrs.get("model_b", attrs.get("model")),
        "view": attrs["view"],
        "variant": attrs["variant"],
        "d": int(attrs["d"]),
    }
    if cross:
        u1 = np.concatenate([arrays["u1_constant_a"], arrays["u1_constant_b"]])
        masks = {"cross_model": np.ones(arrays["overlap"].shape[1:], dtype=bool)}
    else:
        u1 = arrays["u1_constant"]
        masks = scope_masks(len(attrs["layers"]), int(attrs["heads"]))
    for ki, k in enumerate(attrs["k"]):
        rnd = float(arrays["random_baseline"][ki])
        for q, ceil_key in (("overlap", "split_half"), ("captured", "split_half_captured")):
            full, half = arrays[q][ki], arrays[f"half_{q}"][ki]
            ca = arrays[f"{ceil_key}_a"][ki] if cross else arrays[ceil_key][ki]
            cb = arrays[f"{ceil_key}_b"][ki] if cross else ca
            ceil = np.sqrt(np.clip(np.outer(ca, cb), 0, None))
            row = {**base, "k": int(k), "quantity": q, "u1_constant_median": float(np.median(u1))}
            for scope, m in masks.items():
                if q == "captured" and not cross:
                    m = m | m.T  # ordered pairs
                if m.any():
                    recs.append({**row, "scope": scope, **_stats(full[m], rnd, half[m], ceil[m])})
            if not cross:
                recs.append({**row, "scope": "split_half", **_stats(ca, rnd, ca, ca)})
    return recs


_PAIR = ["k", "a", "b"]
OVERLAP_DIMS = {
    "overlap": _PAIR,
    "captured": _PAIR,
    "half_overlap": _PAIR,
    "half_captured": _PAIR,
    "split_half": ["k", "a"],
    "split_half_captured": ["k", "a"],
    "split_half_a": ["k", "a"],
    "split_half_b": ["k", "b"],
    "split_half_captured_a": ["k", "a"],
    "split_half_captured_b": ["k", "b"],
    "random_baseline": ["k"],
    "k": ["k"],
    "u1_constant": ["a"],
    "u1_constant_a": ["a"],
    "u1_constant_b": ["b"],
    "pooled": {
        "overlap": ["k", "layer_a", "layer_b"],
        "captured": ["k", "layer_a", "layer_b"],
        "half_overlap": ["k", "layer_a", "layer_b"],
        "half_captured": ["k", "layer_a", "layer_b"],
        "split_half": ["k", "layer_a"],
        "split_half_captured": ["k", "layer_a"],
    },
}


def write_overlap(path, arrays: dict, attrs: dict) -> None:
    with new_store(path) as root:
        write_arrays(root, arrays, OVERLAP_DIMS, attrs)


def summarise(within_stores, cross_stores):
    """The summary table (docs/method.md §5) from the within- and cross-model overlap stores."""
    recs = []
    for p in [*within_stores, *cross_stores]:
        g = open_store(p)
        arrays = {k: g[k][:] for k in g.array_keys()}
        recs += summary_rows(arrays, g.attrs.asdict())
    return pd.DataFrame.from_records(recs, columns=SUMMARY_COLUMNS)
