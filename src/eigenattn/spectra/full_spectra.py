"""Full-matrix spectra of vectorised view blocks (docs/method.md §4), one group of heads at a time.

Each sequence contributes one sample per head: its view block, flattened to D = |Q|·|K| values.
The outputs per head are the covariance's eigenvalues, the exact total variance, each half's own
spectrum, and the held-out explained variance of one half's principal subspace on the other half.
Two exact routes compute the same numbers (the tests check them against each other, against the
dense covariance and against the former all-heads Gram implementation):

``covariance`` (chosen when D ≤ N)
    float64 moments of each half's D-vectors, streamed in panels of sequences (a rank-m update
    per panel, merged exactly by Chan's parallel update); the whole sample's scatter is the exact
    merge of the halves'. Eigenproblems are D × D.
``gram`` (chosen when D > N)
    the N × N Gram matrix of the vectors (shifted by the first sequence's, which keeps the float64
    sums well conditioned), streamed in panels; centring subtracts row, column and grand means in
    O(N²), and the halves' and cross Grams are centred blocks of it. Eigenproblems are N × N and
    N/2 × N/2.

The nonzero eigenvalues of the scatter Xcᵀ Xc and of the Gram Xc Xcᵀ coincide, so the routes differ
only in cost. A third, optional route, ``rank = r``, computes the top r components of the centred
data matrices with Dask's randomised SVD (``dask.array.linalg.svd_compressed``) and the total
variance exactly; a k_p that needs more than r components is reported as bounded.

row_centered blocks are computed in the coordinates of an orthonormal basis of each row's mean-free
subspace (eigenattn.spectra.full_vectors.centred_basis): the same spectra, with |Q| dimensions fewer.

Work is one Dask task per (variant, layer, group of heads). The group is as large as ``memory_mb``
(split between the tasks in flight) allows, so peak memory is about ``memory_mb`` plus
O(min(N, D)²) per head in flight, whatever L·H is (eigenattn.spectra.full_plan).
"""

from __future__ import annotations

import contextlib

import dask
import numpy as np
from threadpoolctl import threadpool_limits

from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.full_plan import FullPlan, plan_full
from eigenattn.spectra.full_randomized import randomized_task
from eigenattn.spectra.full_vectors import cv_share, empty_outputs, head_reader, pad, ranges, raw_reader, view_dims
from eigenattn.spectra.moments import check_variant, half_block_index
from eigenattn.spectra.rows import eigh_desc

PARALLEL = ("tasks", "blas")


# numpy's LAPACK calls (here and in eigen.eigh_desc) release the GIL, scipy.linalg's f2py wrappers do
# not: with scipy, two heads' eigenproblems in two threads ran no faster than one after the other
# (measured 0.24 s against 0.21 s per 1,024 x 1,024 eigh), with numpy 1.9x faster.


def _eigvals_desc(m: np.ndarray) -> np.ndarray:
    return np.clip(np.linalg.eigvalsh(m)[::-1], 0.0, None)


# ------------------------------------------------------------------------------- covariance route


def _scatter(read, ranges, g: int, D: int):
    """count, mean (g, D) and symmetric scatter matrices (g × D × D) of the vectors in ``ranges``, by
    a rank-m update per panel and Chan's merge of the panel means."""
    count, mean = 0, np.zeros((g, D))
    m2 = [np.zeros((D, D)) for _ in range(g)]
    for s0, s1 in ranges:
        x = read(s0, s1)
        m = s1 - s0
        mu = x.mean(axis=1)
        x -= mu[:, None, :]
        delta = mu - mean
        f = count * m / (count + m)
        for h in range(g):
            _add_gram_upper(m2[h], x[h])
            if count:
                m2[h] += f * np.multiply.outer(delta[h], delta[h])
        mean += delta * (m / (count + m))
        count += m
    h0 = D // 2
    for acc in m2:  # the lower-left block from the upper-right one
        acc[h0:, :h0] = acc[:h0, h0:].T
    return count, mean, m2


def _add_gram_upper(m: np.ndarray, x: np.ndarray) -> None:
    """m += xᵀx for its diagonal and upper-right blocks only (3/4 of the flops of one GEMM; numpy's
    GEMM releases the GIL, scipy's half-flop syrk does not). The lower-left block is filled once
    at the end by :func:`_scatter`."""
    h0 = x.shape[1] // 2
    a, b = x[:, :h0], x[:, h0:]
    m[:h0, :h0] += a.T @ a
    m[:h0, h0:] += a.T @ b
    m[h0:, h0:] += b.T @ b


def _cov_task(scores, layer, heads, qs, ks, variant, plan: FullPlan):
    read = head_reader(scores, layer, heads, qs, ks, variant)
    g, D, N, s = heads.stop - heads.start, plan.d, plan.N, plan.split
    na, mean_a, ma = _scatter(read, ranges(0, s, plan.panel_rows), g, D)
    nb, mean_b, mb = _scatter(read, ranges(s, N, plan.panel_rows), g, D)
    out = empty_outputs(g, plan)
    for h in range(g):
        a, b = ma[h], mb[h]
        delta = mean_a[h] - mean_b[h]
        tot = a + b
        tot += (na * nb / N) * np.multiply.outer(delta, delta)
        out["total_variance"][h] = np.trace(tot) / (N - 1)
        out["eigenvalues"][h] = pad(_eigvals_desc(tot)[: plan.r], plan.r) / (N - 1)
        del tot
        halves = (a, b)  # b's variance along a's direction e is eᵀ·M_b·e (and back)
        _halves_out(out, h, plan, halves, (na, nb), lambda i, e, mu: np.einsum("ij,ij->j", halves[1 - i] @ e, e))
        ma[h] = mb[h] = None
    return out


# ------------------------------------------------------------------------------------- Gram route


def _centre(m: np.ndarray) -> np.ndarray:
    """m - row means - column means + grand mean, in place: H_r m H_c in O(rows·cols)."""
    m -= m.mean(axis=1, keepdims=True)
    m -= m.mean(axis=0, keepdims=True)
    return m


def _gram(read, plan: FullPlan, g: int, shift: np.ndarray) -> np.ndarray:
    N = plan.N
    G = np.empty((g, N, N))
    for p0, p1 in ranges(0, N, plan.panel_rows):
        xp = read(p0, p1)
        xp -= shift
        G[:, p0:p1, p0:p1] = np.matmul(xp, np.swapaxes(xp, -1, -2))
        for c0, c1 in ranges(p1, N, plan.stream_rows):
            xc = read(c0, c1)
            xc -= shift
            blk = np.matmul(xp, np.swapaxes(xc, -1, -2))
            G[:, p0:p1, c0:c1] = blk
            G[:, c0:c1, p0:p1] = np.swapaxes(blk, -1, -2)
    return G


def _gram_task(scores, layer, heads, qs, ks, variant, plan: FullPlan):
    read = head_reader(scores, layer, heads, qs, ks, variant)
    g, N, s = heads.stop - heads.start, plan.N, plan.split
    G = _gram(read, plan, g, read(0, 1))
    out = empty_outputs(g, plan)
    for h in range(g):
        g0 = G[h]
        gaa, gbb = _centre(g0[:s, :s].copy()), _centre(g0[s:, s:].copy())
        gba = _centre(g0[s:, :s].copy())
        # a's direction e_j = Xaᶜᵀ u_j / √μ_j, so b's variance along it is ‖G_baᶜ u_j‖² / μ_j (and back)
        cross = (gba, gba.T)
        _halves_out(
            out,
            h,
            plan,
            (gaa, gbb),
            (s, N - s),
            lambda i, u, mu: ((cross[i] @ u) ** 2).sum(axis=0) / np.where(mu > 0, mu, 1.0),
        )
        gaa = gbb = gba = None  # free them before the whole sample's eigenproblem
        gt = _centre(g0)  # this head's Gram is not needed uncentred any more
        out["total_variance"][h] = np.trace(gt) / (N - 1)
        out["eigenvalues"][h] = _eigvals_desc(gt)[: plan.r] / (N - 1)
    return out


def _halves_out(out, h, plan, mats, counts, other_variance):
    """Each half's own spectrum and the held-out curve, from the halves' scatter or centred Gram
    matrices ``mats``; ``other_variance(i, vectors, eigenvalues)`` gives the other half's variance
    along half i's principal directions (one value per column)."""
    r = plan.r_half
    eig = [eigh_desc(m) for m in mats]
    traces = [float(np.trace(m)) for m in mats]
    shares = []
    for i, j in ((0, 1), (1, 0)):
        mu, vec = eig[i][0][:r], eig[i][1][:, :r]
        var = other_variance(i, vec, mu)
        shares.append(pad(cv_share(var, mu, traces[j]), r, edge=True))
    for i in (0, 1):
        out["half_eigenvalues"][i, h] = pad(eig[i][0][:r] / (counts[i] - 1), r)
        out["half_total_variance"][i, h] = traces[i] / (counts[i] - 1)
    out["ev_heldout"][h] = np.clip(0.5 * (shares[0] + shares[1]), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ entry


def _task(kind, blas_threads, *args):
    limit = threadpool_limits(blas_threads) if blas_threads else contextlib.nullcontext()
    with limit:
        if kind == "covariance":
            return _cov_task(*args)
        if kind == "gram":
            return _gram_task(*args)
        return randomized_task(*args)


def full_spectrum(scores, view: str, variant: str, causal: bool, memory_mb: float, **kw) -> dict:
    """:func:`full_spectra` of one variant (the same keyword arguments: ``rank`` and ``seed`` are required)."""
    return full_spectra(scores, view, [variant], causal, memory_mb, **kw)[variant]


def full_spectra(
    scores,
    view: str,
    variants,
    causal: bool,
    memory_mb: float,
    *,
    rank: int | None,
    seed: int,
    workers: int = 1,
    route: str = "auto",
    parallel: str = "tasks",
) -> dict:
    """Per variant: eigenvalues of the sample covariance of vectorised view blocks (one sample per
    sequence), the exact total variance, each half's own spectrum and the held-out explained
    variance of half-sample subspaces (docs/method.md §4), per layer and head.

    ``scores``: a :class:`~eigenattn.storage.store.ScoreSource` (read directly) or a Dask array (N, L, H,
    n, n). Every variant's (layer, head group) tasks go to Dask together, ``workers`` at once;
    ``parallel='tasks'`` runs them side by side with one BLAS thread each (Dask's threads
    scheduler sets that), ``'blas'`` one after another with ``workers`` BLAS threads. ``route``:
    auto | covariance | gram; ``rank``: top-r randomised spectra instead.
    """
    for v in variants:
        check_variant(v)
    if parallel not in PARALLEL:
        raise ValueError(f"unknown parallel mode '{parallel}' (use one of {', '.join(PARALLEL)})")
    shape, chunks, raw, as_dask = raw_reader(scores)
    n = shape[-1]
    qs, ks = view_slices(view, n, causal)
    D = (qs.stop - qs.start) * (ks.stop - ks.start)
    N, L, H = shape[:3]
    split = int(np.sum(chunks[: half_block_index(chunks)]))
    if min(split, N - split) < 2:
        raise InputError(
            "score stores",
            f"full-matrix spectra need at least 2 sequences per half, got {split} and {N - split}",
            "analyse at least 4 sequences, in at least 2 chunks of extraction.chunk_sequences",
        )
    if rank is not None and rank < 1:
        raise ConfigError(
            "eigen.full_rank",
            f"must be a positive number of components, got {rank}",
            "write an integer >= 1, or null for exact spectra",
        )
    plans = {
        v: plan_full(
            N, D, L, H, split, max(chunks), memory_mb, workers, route, rank=rank, D_eff=view_dims(qs, ks, v)[1]
        )
        for v in variants
    }
    groups = {v: [slice(h, min(h + p.group, H)) for h in range(0, H, p.group)] for v, p in plans.items()}
    blas = workers if parallel == "blas" else None
    randomized = rank is not None
    source, extra = (as_dask(), (seed,)) if randomized else (raw, ())

    def task(variant: str, layer: int, grp: slice):  # a closure: Dask must not see the score array
        plan = plans[variant]
        return _task(plan.route, blas, source, layer, grp, qs, ks, variant, plan, *extra)

    keys = [(v, layer, gi) for v in variants for layer in range(L) for gi in range(len(groups[v]))]
    tasks = [dask.delayed(task, pure=False)(v, layer, groups[v][gi]) for v, layer, gi in keys]
    if parallel == "blas":
        parts = [dask.compute(t, scheduler="sync")[0] for t in tasks]
    else:
        with dask.config.set(num_workers=max(int(workers), 1)):
            parts = list(dask.compute(*tasks))
    got = dict(zip(keys, parts))
    out = {}
    for v in variants:
        plan, res = plans[v], {}
        for key, axis in (
            ("eigenvalues", 0),
            ("total_variance", 0),
            ("ev_heldout", 0),
            ("half_eigenvalues", 1),
            ("half_total_variance", 1),
        ):
            per_layer = [
                np.concatenate([got[v, layer, gi][key] for gi in range(len(groups[v]))], axis=axis)
                for layer in range(L)
            ]
            res[key] = np.stack(per_layer, axis=axis)
        out[v] = {**res, "n_samples": N, "dim": D, "split_sequence": split, "route": plan.route, "rank": plan.rank}
    return out
