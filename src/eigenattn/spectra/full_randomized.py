"""The randomised top-r route of the full-matrix analysis (``eigen.full_rank``): the top r components
of each head's centred data matrices (whole sample and each half) by Dask's randomised SVD, with the
exact total variance. Memory is O((N + D)·r) per head; the data are read once per power iteration."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from eigenattn.spectra.full_plan import FullPlan
from eigenattn.spectra.full_vectors import centred_basis, cv_share, empty_outputs, pad, view_dims, view_vectors


def _head_matrix(scores, layer: int, head: int, qs, ks, variant: str):
    """Dask array (N, D) of one head's vectorised view blocks, chunked like the store."""
    x = scores[:, layer, head : head + 1]
    D = view_dims(qs, ks, variant)[1]
    basis = centred_basis(ks.stop - ks.start) if variant == "row_centered" else None
    return da.map_blocks(
        lambda b: view_vectors(b, qs, ks, variant, basis)[0],
        x,
        dtype=np.float64,
        drop_axis=[2, 3],
        chunks=(x.chunks[0], (D,)),
        meta=np.empty((0, 0)),
    )


def randomized_task(scores, layer, heads, qs, ks, variant, plan: FullPlan, seed: int):
    N, s = plan.N, plan.split
    out = empty_outputs(heads.stop - heads.start, plan)
    for h, head in enumerate(range(heads.start, heads.stop)):
        x = _head_matrix(scores, layer, head, qs, ks, variant)
        parts = {"t": x, "a": x[:s], "b": x[s:]}
        cen = {k: v - v.mean(axis=0) for k, v in parts.items()}
        svd = {}
        for k, v in cen.items():
            r = min(plan.r if k == "t" else plan.r_half, plan.d)
            _, sv, vt = da.linalg.svd_compressed(
                v, r, n_power_iter=4, seed=seed + 7919 * layer + 104729 * head, compute=False
            )
            svd[k] = (sv, vt)
        tots = {k: (v**2).sum() for k, v in cen.items()}
        proj = {"a": ((cen["b"] @ svd["a"][1].T) ** 2).sum(axis=0), "b": ((cen["a"] @ svd["b"][1].T) ** 2).sum(axis=0)}
        (svd, tots, proj) = dask.compute(svd, tots, proj, scheduler="sync")
        counts = {"a": s, "b": N - s}
        out["eigenvalues"][h] = pad(svd["t"][0] ** 2, plan.r) / (N - 1)
        out["total_variance"][h] = tots["t"] / (N - 1)
        shares = []
        for i, (k, other) in enumerate((("a", "b"), ("b", "a"))):
            mu = svd[k][0] ** 2
            out["half_eigenvalues"][i, h] = pad(mu / (counts[k] - 1), plan.r_half)
            out["half_total_variance"][i, h] = tots[k] / (counts[k] - 1)
            shares.append(pad(cv_share(proj[k], mu, tots[other]), plan.r_half, edge=True))
        out["ev_heldout"][h] = np.clip(0.5 * (shares[0] + shares[1]), 0.0, 1.0)
    return out
