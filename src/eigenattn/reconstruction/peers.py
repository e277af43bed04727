"""Peers of the paper's estimators: the methods people use to skip attention scores
(docs/method.md, "Peers at equal cost"). Each approximates the view block only.

All functions work on torch tensors with any leading batch axes (sequences, heads) and are used
three ways: on the stored scores of whole sequences (the held-out evaluation), inside the
attention backend from Q and K (the plug-in and training), and in the tests against brute force.

- :func:`nystrom_from_scores` / :func:`nystrom_from_qk` (Xiong et al. 2021): m landmarks, the means
  of m contiguous segments of the queries and of the keys;
  ``P̂ = softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ)``. When the scores are exactly
  ``scale·QKᵀ`` the three kernels are linear in S: the segment means of S's columns (``Q K̃ᵀ``), of
  its rows (``Q̃ Kᵀ``) and of its blocks (``Q̃ K̃ᵀ``), so stored scores suffice. With an additive
  position bias, a softcap or a sink term this identity fails, and the caller refuses.
  It returns probabilities (rows sum to about 1, entries can be negative), plus the landmark
  estimate of the block's log partition function (:func:`landmark_log_z`), which weighs the block
  against exact keys outside the view.
- :func:`topk_keys`: each row's s largest scores (``topk_oracle``: needs every score, a bound).
- :func:`sink_window_keys`: the first ``sinks`` keys and the s − sinks keys nearest the query
  (StreamingLLM-style), the same for every input.
- :func:`vertical_slash_keys` (MInference-style): from the softmax rows of the view's last
  ``q_last`` queries, the ⌈s/2⌉ key columns with the most mass ("vertical") for every row, then
  per row the keys on the diagonals (query − key offsets) with the most mass ("slash"), in that
  order, until the row has s keys.

The sparse methods return a boolean key mask with exactly s True entries per row; the row's
softmax then runs over those keys (:func:`masked_logits`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from eigenattn.config.schema import enum
from eigenattn.errors import ConfigError

PEERS = enum("reconstruction.peers")
PINV = enum("reconstruction.nystrom_pinv")


def segments(n: int, m: int) -> np.ndarray:
    """(m, n) averaging matrix of m contiguous segments of n positions (sizes differ by at most 1)."""
    if not 1 <= m <= n:
        raise ValueError(f"{m} landmarks for {n} positions")
    edges = np.linspace(0, n, m + 1).round().astype(int)
    A = np.zeros((m, n))
    for i in range(m):
        A[i, edges[i] : edges[i + 1]] = 1.0 / (edges[i + 1] - edges[i])
    return A


def iterative_pinv(A: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Nyströmformer's iterative Moore–Penrose approximation (Razavi et al. 2014), batched."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    norm = A.abs().sum(dim=-2).amax(dim=-1) * A.abs().sum(dim=-1).amax(dim=-1)
    Z = A.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iterations):
        AZ = A @ Z
        Z = 0.25 * Z @ (13 * eye - AZ @ (15 * eye - AZ @ (7 * eye - AZ)))
    return Z


def _pinv(A: torch.Tensor, pinv: str) -> torch.Tensor:
    if pinv == "exact":  # cut-off eps·m of A's own dtype, so the product stays consistent in it
        return torch.linalg.pinv(A)
    if pinv == "iterative":
        return iterative_pinv(A)
    raise ConfigError("reconstruction.nystrom_pinv", f"unknown pseudo-inverse '{pinv}'", f"use one of {PINV}")


def segment_of(n: int, m: int) -> np.ndarray:
    """The segment (0..m−1) of each of n positions, as in :func:`segments`."""
    return segments(n, m).argmax(axis=0)


def segment_sizes(n: int, m: int) -> np.ndarray:
    """The number of positions in each of :func:`segments`' m segments."""
    return np.diff(np.linspace(0, n, m + 1).round().astype(int)).astype(np.float64)


def landmark_gap(K2, K3, log_c):
    """Per landmark query: its exact log partition function over the view's keys (a row of K3)
    minus the landmark estimate of it (from K2)."""
    return torch.logsumexp(K3, dim=-1) - torch.logsumexp(K2 + log_c, dim=-1)


def landmark_log_z(K1, K2, K3, key_counts, query_segment):
    """The landmark estimate of each query's log partition function over the view's keys.

    ``log Σ_l c_l exp(q·k̃_l)`` (c_l the key segment sizes) replaces each key segment by its mean, so
    by Jensen's inequality it is low. It is calibrated with the landmark queries, whose exact
    partition function ``logsumexp(q̃·K)`` is known from K3: each query gets its own segment's gap
    ``δ_a = logsumexp(K3_a) − log Σ_l c_l exp(K2_al)`` added. Both are exact when m = n."""
    log_c = torch.log(key_counts)
    seg = torch.as_tensor(query_segment, device=K1.device)
    return torch.logsumexp(K1 + log_c, dim=-1) + landmark_gap(K2, K3, log_c)[..., seg]


def nystrom_from_kernels(K1, K2, K3, key_counts, query_segment, pinv: str):
    """(P̂, log Ẑ) from the landmark logits K1 (…, nq, m), K2 (…, m, m), K3 (…, m, d)."""
    P = torch.softmax(K1, dim=-1) @ _pinv(torch.softmax(K2, dim=-1), pinv) @ torch.softmax(K3, dim=-1)
    return P, landmark_log_z(K1, K2, K3, key_counts, query_segment)


def nystrom_from_scores(X: torch.Tensor, m: int, pinv: str):
    """Nyström attention of the view block from its scores X (…, nq, d), which must be scale·QKᵀ."""
    nq, d = X.shape[-2:]
    Aq = torch.from_numpy(segments(nq, m)).to(X)
    Ak = torch.from_numpy(segments(d, m)).to(X)
    K1 = X @ Ak.T  # segment means of the columns: Q K̃ᵀ
    K3 = Aq @ X  # segment means of the rows: Q̃ Kᵀ
    K2 = K3 @ Ak.T  # block means: Q̃ K̃ᵀ
    counts = torch.from_numpy(segment_sizes(d, m)).to(X)
    return nystrom_from_kernels(K1, K2, K3, counts, segment_of(nq, m), pinv)


def nystrom_from_qk(Q: torch.Tensor, K: torch.Tensor, m: int, scale: float, pinv: str):
    """Nyström attention from queries (…, nq, dh) and keys (…, d, dh) of the view."""
    nq, d = Q.shape[-2], K.shape[-2]
    Aq = torch.from_numpy(segments(nq, m)).to(Q)
    Ak = torch.from_numpy(segments(d, m)).to(Q)
    Ql, Kl = Aq @ Q, Ak @ K  # landmarks
    K1 = scale * Q @ Kl.transpose(-1, -2)
    K2 = scale * Ql @ Kl.transpose(-1, -2)
    K3 = scale * Ql @ K.transpose(-1, -2)
    counts = torch.from_numpy(segment_sizes(d, m)).to(Q)
    return nystrom_from_kernels(K1, K2, K3, counts, segment_of(nq, m), pinv)


def topk_keys(X: torch.Tensor, s: int) -> torch.Tensor:
    """Mask of each row's s largest scores (the oracle: it reads every score)."""
    idx = X.topk(s, dim=-1).indices
    return torch.zeros(X.shape, dtype=torch.bool, device=X.device).scatter_(-1, idx, True)


def sink_count(s: int, sinks: int) -> int:
    """Sink keys within a budget of s: at most half of it, so the local window keeps s − sinks ≥ s/2."""
    return min(int(sinks), int(s) // 2)


def sink_window_keys(q_pos: np.ndarray, k_pos: np.ndarray, s: int, sinks: int) -> torch.Tensor:
    """(nq, d) mask: the first sink_count(s, sinks) keys and the s − that keys nearest each query
    (by |query − key| position, ties to the earlier key). The same for every input and head."""
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    d = len(k_pos)
    if not 1 <= s <= d:
        raise ValueError(f"s={s} keys of {d}")
    n_sink = sink_count(s, sinks)
    dist = np.abs(q_pos[:, None] - k_pos[None, :]).astype(np.float64) + 1e-6 * np.arange(d)[None, :]
    dist[:, :n_sink] = -1.0  # sinks first
    order = np.argsort(dist, axis=1, kind="stable")[:, :s]
    mask = np.zeros((len(q_pos), d), dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return torch.from_numpy(mask)


def vertical_slash_pattern(X: torch.Tensor, q_pos: np.ndarray, k_pos: np.ndarray, q_last: int, visible=None):
    """(vertical (…, d), slash (…, offsets)) mass from the view's last ``q_last`` softmax rows of X
    (…, nq, d), and the index of each (query, key)'s diagonal (nq, d)."""
    nq = X.shape[-2]
    q_last = min(int(q_last), nq)
    last = X[..., nq - q_last :, :]
    if visible is not None:
        last = last.masked_fill(~torch.as_tensor(visible[nq - q_last :], device=X.device), float("-inf"))
    p = torch.softmax(last, dim=-1)  # (…, q_last, d)
    offsets = np.asarray(q_pos)[:, None] - np.asarray(k_pos)[None, :]  # (nq, d)
    off_idx = torch.from_numpy(offsets - offsets.min()).to(X.device)
    width = int(off_idx.max()) + 1
    flat = off_idx[nq - q_last :].reshape(-1).expand(*p.shape[:-2], -1)
    slash = torch.zeros((*p.shape[:-2], width), dtype=p.dtype, device=X.device)
    slash.scatter_add_(-1, flat, p.reshape(*p.shape[:-2], -1))  # the mass of each diagonal
    return p.sum(dim=-2), slash, off_idx


def vertical_slash_select(vertical, slash, off_rows, s: int, visible_rows=None) -> torch.Tensor:
    """Mask (…, r, d) of exactly s keys for rows whose diagonal indices are ``off_rows`` (r, d)
    (or (…, r, d)): the ⌈s/2⌉ strongest columns, then the keys on the strongest diagonals, ties by
    column mass. ``vertical`` (…, d) and ``slash`` (…, width) broadcast over the rows."""
    n_vert = math.ceil(s / 2)
    top_v = torch.zeros(vertical.shape, dtype=torch.bool, device=vertical.device)
    top_v.scatter_(-1, vertical.topk(n_vert, dim=-1).indices, True)
    tiny = torch.finfo(slash.dtype).tiny
    s_norm = slash / slash.amax(dim=-1, keepdim=True).clamp_min(tiny)
    v_norm = vertical / vertical.amax(dim=-1, keepdim=True).clamp_min(tiny)
    shape = torch.broadcast_shapes(s_norm.shape[:-1] + (1, 1), off_rows.shape)
    diag = torch.gather(s_norm[..., None, :].expand(*shape[:-1], -1), -1, off_rows.expand(shape))
    prio = 0.99 * diag + 1e-3 * v_norm[..., None, :] + 3.0 * top_v[..., None, :]
    if visible_rows is not None:
        prio = prio.masked_fill(~torch.as_tensor(visible_rows, device=prio.device), float("-inf"))
    idx = prio.topk(s, dim=-1).indices
    return torch.zeros(prio.shape, dtype=torch.bool, device=prio.device).scatter_(-1, idx, True)


def vertical_slash_keys(
    X: torch.Tensor, q_pos: np.ndarray, k_pos: np.ndarray, s: int, q_last: int, visible=None
) -> torch.Tensor:
    """Mask (…, nq, d) of s keys per row chosen from the view's last ``q_last`` query rows of X
    (…, nq, d); ``visible``: (nq, d) bool, False where the model's mask hides a key."""
    if not 1 <= s <= X.shape[-1]:
        raise ValueError(f"s={s} keys of {X.shape[-1]}")
    vertical, slash, off_idx = vertical_slash_pattern(X, q_pos, k_pos, q_last, visible)
    return vertical_slash_select(vertical, slash, off_idx, s, visible)


def masked_logits(X: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """X where ``keep``, −inf elsewhere: the softmax of a row attends to its kept keys only."""
    return X.masked_fill(~keep, float("-inf"))


class Geometry:
    """Where a view block sits: the absolute positions of its queries and keys, and which keys the
    model's mask lets each query see (None: all)."""

    def __init__(self, q_pos, k_pos, visible=None):
        self.q_pos = np.asarray(q_pos)
        self.k_pos = np.asarray(k_pos)
        self.visible = None if visible is None or bool(np.all(visible)) else np.asarray(visible, dtype=bool)

    @property
    def nq(self) -> int:
        return len(self.q_pos)

    @property
    def d(self) -> int:
        return len(self.k_pos)


def check_peer(method: str, s: int, geometry: Geometry, key: str) -> None:
    """Refuse a peer that cannot run on this view (``key``: the config key that asked for it)."""
    if method not in PEERS:
        raise ConfigError(key, f"unknown peer '{method}'", f"use one of {', '.join(PEERS)}")
    limit = min(geometry.nq, geometry.d) if method == "nystrom" else geometry.d
    if not 1 <= s <= limit:
        raise ConfigError(
            key,
            f"{method} at s={s} needs 1 ≤ s ≤ {limit} (the view has {geometry.nq} queries and {geometry.d} keys)",
            f"use subset sizes up to {limit}",
        )
    if method == "nystrom" and geometry.visible is not None:
        raise ConfigError(
            key,
            "nystrom needs every key of the view visible to every query of it (its kernels mix rows)",
            "use the prefix view for causal models, or leave nystrom out",
        )


def estimate_rows(
    method: str, X: torch.Tensor, s: int, geometry: Geometry, seq, q, *, q_last: int, sinks: int, pinv: str
):
    """A peer on view blocks X (c, H, nq, d) of whole sequences, returned for rows (seq[i], q[i])
    only, as (r, H, d) [and (r, H)]: ``("logits", L)`` with −inf at keys a sparse method skips, or
    ``("probs", P̂, log Ẑ)`` for nystrom (from scores: X must be scale·QKᵀ). The per-sequence parts
    (nystrom's landmark kernels, vertical_slash's pattern) use every row of the sequence."""
    seq, q = torch.as_tensor(seq), torch.as_tensor(q)
    Xr = X[seq, :, q]  # (r, H, d)
    vis = None if geometry.visible is None else torch.from_numpy(geometry.visible)[q][:, None, :]  # (r, 1, d)
    if method == "nystrom":
        nq, d = X.shape[-2:]
        Aq = torch.from_numpy(segments(nq, s)).to(X)
        Ak = torch.from_numpy(segments(d, s)).to(X)
        K3 = Aq @ X  # (c, H, m, d)
        K2 = K3 @ Ak.T
        right = _pinv(torch.softmax(K2, dim=-1), pinv) @ torch.softmax(K3, dim=-1)  # (c, H, m, d)
        K1 = Xr @ Ak.T  # (r, H, m)
        P = (torch.softmax(K1, dim=-1)[..., None, :] @ right[seq]).squeeze(-2)
        log_c = torch.log(torch.from_numpy(segment_sizes(d, s)).to(X))
        seg = torch.from_numpy(segment_of(nq, s))[q]  # each chosen row's query segment
        return ("probs", P, torch.logsumexp(K1 + log_c, dim=-1) + landmark_gap(K2, K3, log_c)[seq, :, seg])
    if method == "topk_oracle":
        keep = topk_keys(Xr if vis is None else Xr.masked_fill(~vis, float("-inf")), s)
    elif method == "sink_window":
        keep = sink_window_keys(geometry.q_pos, geometry.k_pos, s, sinks).to(X.device)[q][:, None, :].expand(Xr.shape)
    elif method == "vertical_slash":
        vertical, slash, off_idx = vertical_slash_pattern(X, geometry.q_pos, geometry.k_pos, q_last, geometry.visible)
        rows_vis = None if vis is None else vis[:, :, None, :]  # each picked row is its own (r, H, 1, d) batch
        keep = vertical_slash_select(vertical[seq], slash[seq], off_idx[q][:, None, None, :], s, rows_vis).squeeze(-2)
    else:
        raise ValueError(f"unknown peer '{method}'")
    return ("logits", masked_logits(Xr, keep))


def estimate(method: str, X: torch.Tensor, s: int, geometry: Geometry, *, q_last: int, sinks: int, pinv: str):
    """A peer on view blocks X (…, nq, d) of whole sequences: ``("logits", L)`` with −inf at keys
    a sparse method skips, or ``("probs", P̂, log Ẑ)`` for nystrom (from scores: X must be scale·QKᵀ)."""
    if method == "nystrom":
        P, log_z = nystrom_from_scores(X, s, pinv)
        return ("probs", P, log_z)
    if method == "topk_oracle":
        Xv = X if geometry.visible is None else X.masked_fill(~torch.from_numpy(geometry.visible), float("-inf"))
        keep = topk_keys(Xv, s)
    elif method == "sink_window":
        keep = sink_window_keys(geometry.q_pos, geometry.k_pos, s, sinks).to(X.device).expand(X.shape)
    elif method == "vertical_slash":
        keep = vertical_slash_keys(X, geometry.q_pos, geometry.k_pos, s, q_last, geometry.visible)
    else:
        raise ValueError(f"unknown peer '{method}'")
    return ("logits", masked_logits(X, keep))


def sink_window_whole_keys(n: int, s: int, sinks: int) -> torch.Tensor:
    """(n, n) dense mask of sink + window in whole causal scope: row i keeps what
    ``sink_window_keys([i], keys 0..i, min(s, i+1), sinks)`` keeps, i.e. the ``sink_count(s, sinks)``
    first keys and the ``s − that`` latest keys up to i (every key when i < s)."""
    n_sink = sink_count(s, sinks)
    i = torch.arange(n)
    causal = i[None, :] <= i[:, None]
    return causal & ((i[None, :] < n_sink) | (i[:, None] - i[None, :] < s - n_sink))
