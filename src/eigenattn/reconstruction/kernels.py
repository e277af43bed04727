"""Real kernels: each attention method as it would be deployed (docs/method.md, "Cost by the clock").

Every function here computes the output ``O = P·V`` (batch, heads, n, d_head), the layout of
``torch.nn.functional.scaled_dot_product_attention``, of one attention call with every query
(a whole prefill), and computes exactly what its dense-mask reference in
:mod:`eigenattn.reconstruction.peers`, :mod:`eigenattn.reconstruction.peer_attention` and
:mod:`eigenattn.reconstruction.partial` computes, within float tolerance (``tests/test_kernels.py``
holds them to 1e-5 in float32; Nyström with the exact pseudo-inverse to 1e-4, as its ill-conditioned
landmark kernel amplifies the rounding of another association order). None of them forms the n×n
score matrix.

Two scopes (§15):

- **whole**: the method applies to every query of a causal head, as a deployed decoder runs it.
  Defined for :func:`sink_window_attention` and :func:`vertical_slash_attention`.
- **view**: the method applies to the view block (queries ``query_range`` × keys ``key_range``)
  only, everything else stays exact, as the paper's analysis and the plug-in do
  (:func:`peer_attention`, :func:`partial_scores`). The project's views are ``all`` (every query
  against every key, bidirectional) and ``prefix`` (queries [n/2, n) against keys [0, n/2)): the
  view's keys start at key 0 and its queries run to the last one. :func:`sink_window_view_attention`,
  :func:`vertical_slash_view_attention`, :func:`nystrom_attention` and :func:`partial_attention`
  run in this scope.

The kernels:

- **sink + window** (:func:`sink_window_attention`): FlexAttention with a block mask (``BLOCK``
  keys a block), per-head sink counts and windows in one call; key blocks without a kept key are
  never loaded. ``compiled=True`` runs ``torch.compile(flex_attention)`` (fused; on CUDA through
  Triton), else eager FlexAttention, which materialises the scores (for tests).
- **vertical-slash** (:func:`vertical_slash_attention`, MInference-style): the pattern comes from
  the last ``q_last`` queries' softmax rows (``q_last·n·d_head``); :func:`vertical_slash_index`
  turns it into each row's kept keys, the same keys the reference keeps. The first s rows keep
  every visible key and run as one exact causal SDPA block; every later row's keys are three parts:
  the vertical keys (⌈s/2⌉ columns, gathered into a dense (⌈s/2⌉, d_head) buffer, causal per row),
  a diagonal band (offsets 0..w−1 that every row keeps, vertical keys excluded so no key counts
  twice, computed by a banded block kernel) and each row's remaining diagonal keys (gathered per
  row). The three partial softmaxes merge by log-sum-exp. A column costs one key, not its block.
  On a view (:func:`vertical_slash_view_attention`) every row keeps all ⌈s/2⌉ columns and its own
  diagonal keys, merged with the row's exact keys outside the view.
- **Nyström** (:func:`nystrom_attention`): the landmark GEMMs in the factored order
  ``softmax(QK̃ᵀ)·(pinv(softmax(Q̃K̃ᵀ))·(softmax(Q̃Kᵀ)·V))``; the view's queries weigh it against
  their exact keys outside the view by the landmark estimate of the partition function, as
  :func:`peer_attention` does.
- **the paper's estimators** (:func:`partial_attention`): the s scores ``a_T = scale·Q K_Tᵀ``, the
  map ``Â = a_T Wᵀ + b``, the softmax and ``P·V`` over the view, merged with the exact keys outside
  the view by log-sum-exp. ``subset_only`` (W the identity on T, −inf elsewhere) gathers the s
  keys and values only.

Exact parts that need their log-sum-exp (the keys outside a view) run through the device's fused
SDPA kernel that returns it (:func:`sdpa_lse`): compiled FlexAttention on CPU cannot return it
(torch 2.13), so FlexAttention serves the patterns that need no merge.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from eigenattn.reconstruction.peers import (
    _pinv,
    landmark_log_z,
    segment_of,
    segment_sizes,
    segments,
    sink_count,
    sink_window_keys,
    sink_window_whole_keys,  # noqa: F401 (its dense-mask reference, kept beside the kernel)
    vertical_slash_pattern,
    vertical_slash_select,
)

BLOCK = 128  # the key (and query) block of the block-sparse kernels and of the blocks axis
_COMPILED = {}


def flex(compiled: bool):
    """``flex_attention``, compiled once per process when asked (the compiled function recompiles
    per new shape; torch caches that)."""
    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED:
        # one compile per shape and mask code: past torch's default limit of 8 it would fall back
        # to eager FlexAttention silently, and a latency table would time the unfused path
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# partial softmaxes and their merge


def partial_softmax(scores: torch.Tensor, values: torch.Tensor):
    """(out, lse) of the softmax of ``scores`` (…, r, c) over its last axis (−inf: not kept) times
    ``values`` (…, c, dh). A row with no kept key gets out 0 and lse −inf."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - safe[..., None])
    return p @ values, lse


def merge(parts):
    """Merge partial attentions [(out (…, n, dh), lse (…, n)), …] over disjoint key sets by log-sum-exp."""
    lse = torch.stack([p[1] for p in parts])
    top = lse.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)  # (parts, …, n)
    total = w.sum(dim=0)
    out = sum(w[i][..., None] * parts[i][0] for i in range(len(parts)))
    return out / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None]


def sdpa_lse(q, k, v, scale: float, causal: bool):
    """Exact attention and its log-sum-exp from the device's fused SDPA kernel: (out, lse (…, nq)).
    ``causal``: query t sees keys 0..t (top-left aligned, as SDPA's ``is_causal``)."""
    if q.shape[-2] == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1])
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale
        )[:2]
        return out, lse[..., : q.shape[-2]].to(q.dtype)
    scores = (q @ k.transpose(-1, -2)) * scale  # any other device: the plain form
    if causal:
        hide = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hide, float("-inf"))
    return partial_softmax(scores, v)


# ---------------------------------------------------------------------------------------------
# sink + window (whole scope): FlexAttention block-sparse


def _per_head(x, heads: int, device) -> torch.Tensor:
    t = torch.as_tensor(np.broadcast_to(np.asarray(x, dtype=np.int64), (heads,)).copy(), device=device)
    return t


def sink_window_sizes(s, sinks: int, heads: int, device="cpu"):
    """Per head (sink keys, window): ``sink_count(s, sinks)`` and ``s − that`` (``s``: an int or one per head)."""
    s = np.broadcast_to(np.asarray(s, dtype=np.int64), (heads,))
    if (s < 1).any():
        raise ValueError(f"s={s.tolist()}: every head needs s ≥ 1")
    n_sink = np.array([sink_count(int(x), sinks) for x in s])
    return _per_head(n_sink, heads, device), _per_head(s - n_sink, heads, device)


def sink_window_mask_mod(n_sink: torch.Tensor, window: torch.Tensor):
    """FlexAttention mask_mod of sink + window in whole causal scope: query i keeps key j ≤ i when
    j is one of head h's first ``n_sink[h]`` keys or one of its ``window[h]`` latest (i − j < window)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < n_sink[h]) | (q_idx - kv_idx < window[h]))

    return mask_mod


def sink_window_block_mask(n: int, s, sinks: int, heads: int, device="cpu", block: int = BLOCK):
    """The FlexAttention BlockMask of sink + window in whole causal scope (``s``: int or per head)."""
    n_sink, window = sink_window_sizes(s, sinks, heads, device)
    return create_block_mask(sink_window_mask_mod(n_sink, window), None, heads, n, n, device=device, BLOCK_SIZE=block)


def sink_window_attention(q, k, v, s, sinks: int, *, scale=None, compiled: bool = False, block_mask=None):
    """Sink + window attention of every query of causal heads (q, k, v: (B, H, n, dh)), whole scope:
    query i attends to the first ``sink_count(s, sinks)`` keys and its ``s − that`` latest keys
    (itself included), both up to i. ``s`` is an int or one per head (one call for all heads).
    The dense-mask reference is ``softmax(masked_logits(S, sink_window_whole_keys(n, s, sinks)))·V``."""
    H, n = q.shape[1], q.shape[2]
    if block_mask is None:
        block_mask = sink_window_block_mask(n, s, sinks, H, q.device)
    return flex(compiled)(q, k, v, block_mask=block_mask, scale=_scale(q, scale))


def _check_view(n: int, query_range, key_range, causal: bool):
    q0, q1 = map(int, query_range)
    k0, k1 = map(int, key_range)
    if k0 != 0 or q1 != n or not (0 <= q0 < q1 and 0 < k1 <= n):
        raise ValueError(
            f"view queries {q0}..{q1 - 1}, keys {k0}..{k1 - 1} of n={n}: the kernels take views whose keys start at 0 "
            "and whose queries run to the last one (the all and prefix views)"
        )
    if causal and k1 > q0 + 1:
        raise ValueError(f"a causal view's keys (to {k1 - 1}) must precede its first query {q0} (the prefix view)")
    return q0, q1, k0, k1


def sink_window_view_attention(
    q,
    k,
    v,
    s: int,
    sinks: int,
    *,
    query_range,
    key_range,
    causal: bool,
    scale=None,
    compiled: bool = False,
    block_mask=None,
):
    """Sink + window on the view block only, everything else exact (the view scope of
    :func:`peer_attention` with a ``sink_window`` PeerSpec), as one FlexAttention call: the view's
    kept keys are ``sink_window_keys`` of the view; the mask_mod reads them from an (nq, d) table."""
    if block_mask is None:
        block_mask = sink_window_view_block_mask(q.shape[2], s, sinks, query_range, key_range, causal, q.device)
    return flex(compiled)(q, k, v, block_mask=block_mask, scale=_scale(q, scale))


def sink_window_view_block_mask(
    n: int, s: int, sinks: int, query_range, key_range, causal: bool, device="cpu", block: int = BLOCK
):
    """BlockMask of sink + window on a view, exact elsewhere (causal or not)."""
    q0, q1, k0, k1 = _check_view(n, query_range, key_range, causal)
    keep = sink_window_keys(np.arange(q0, q1), np.arange(k0, k1), s, sinks).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        in_view = (q_idx >= q0) & (kv_idx < k1)
        kept = keep[(q_idx - q0).clamp(0, q1 - q0 - 1), kv_idx.clamp(0, k1 - 1)]
        visible = (kv_idx <= q_idx) if causal else (kv_idx >= 0)
        return visible & (~in_view | kept)

    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=block)


# ---------------------------------------------------------------------------------------------
# vertical-slash (whole scope): gathered columns + banded block kernel + per-row diagonals


class VSIndex(NamedTuple):
    """Each row's kept keys of vertical-slash, for G = batch·heads. Rows ``0..dense_rows−1`` (at most
    s visible keys) keep every key up to themselves: exact causal attention. Every later row i keeps
    the ``verticals`` (G, ⌈s/2⌉) key columns ≤ i, the ``band`` (G,) keys i−w+1..i that are not
    vertical, and its ``extras`` (G, n, e) other diagonal keys (−1: none). The parts are disjoint."""

    verticals: torch.Tensor
    band: torch.Tensor
    extras: torch.Tensor
    dense_rows: int
    fallback_rows: int  # rows whose keys came from the reference's full-row rule (diagnostic)


def vertical_slash_index(
    q, k, s: int, q_last: int, scale=None, *, block: int = BLOCK, candidates: int | None = None
) -> VSIndex:
    """The keys vertical-slash keeps per row in whole causal scope, for q, k (G, n, dh): exactly those
    of ``vertical_slash_keys(scale·QKᵀ, 0..n−1, 0..n−1, s, q_last, causal)`` (with the model's causal
    mask on top), without forming any row's n priorities where it can be avoided.

    The pattern (column and diagonal mass) comes from the last ``q_last`` rows, as in the reference.
    A row keeps its visible vertical columns (priority ≥ 3 beats any other key) and fills the rest of
    its s keys with the best of ``0.99·diag[i−j] + 1e-3·col[j]``. For each block of rows the best
    diagonals are candidates; a row whose s-th pick beats every non-candidate's upper bound is
    certified, any other row falls back to the reference rule (:func:`vertical_slash_select`) on its
    whole row. Rows with at most s visible keys keep all of them. ``candidates``: diagonals per
    block of rows (default s + block + 32, enough for every row unless priorities nearly tie).
    Exact float ties between two keys' priorities are broken by ``topk``'s order, as in the
    reference, and may pick the other key of the tie."""
    G, n, _ = q.shape
    if not 1 <= s <= n:
        raise ValueError(f"s={s} keys of {n}")
    scale = _scale(q, scale)
    dev = q.device
    ql = min(int(q_last), n)
    last_pos = np.arange(n - ql, n)
    Xl = torch.matmul(q[:, n - ql :], k.transpose(-1, -2)) * scale  # the pattern's q_last·n·dh
    vis_last = np.arange(n)[None, :] <= last_pos[:, None]
    vertical, slash, _ = vertical_slash_pattern(Xl, last_pos, np.arange(n), ql, vis_last)
    shift = ql - 1  # slash index of offset o = i − j is o + shift (the min offset is 1 − ql)
    n_vert = math.ceil(s / 2)
    verticals = vertical.topk(n_vert, dim=-1).indices
    is_v = torch.zeros((G, n), dtype=torch.bool, device=dev).scatter_(-1, verticals, True)
    tiny = torch.finfo(slash.dtype).tiny
    s_norm = slash / slash.amax(dim=-1, keepdim=True).clamp_min(tiny)
    v_norm = vertical / vertical.amax(dim=-1, keepdim=True).clamp_min(tiny)
    a = 0.99 * s_norm[:, shift : shift + n]  # (G, n): diagonal term of offset o = 0..n−1
    vt = 1e-3 * v_norm  # (G, n): column term
    vt_top = vt.masked_fill(is_v, float("-inf")).amax(dim=-1)  # (G,)
    c = is_v.cumsum(dim=-1)  # verticals at or before each row
    sel = torch.full((G, n, s), -1, dtype=torch.long, device=dev)
    rows_all = torch.arange(n, device=dev)
    full = min(s, n)  # rows with at most s visible keys keep every one: the dense rows
    fallback = []
    for r0 in range(full, n, block):
        r1 = min(r0 + block, n)
        rows = rows_all[r0:r1]
        m = min(r1, s + block + 32 if candidates is None else int(candidates))
        if m >= r1:
            cand = torch.arange(r1, device=dev).expand(G, r1)
            bound = torch.full((G,), float("-inf"), device=dev, dtype=a.dtype)
        else:
            cand = a[:, :r1].topk(m, dim=-1).indices
            bound = a[:, :r1].scatter(-1, cand, float("-inf")).amax(dim=-1) + vt_top
        j = rows[None, :, None] - cand[:, None, :]  # (G, R, m)
        jc = j.clamp_min(0)
        valid = (j >= 0) & ~torch.gather(is_v[:, None, :].expand(-1, len(rows), -1), 2, jc)
        p = a.gather(1, cand)[:, None, :] + torch.gather(vt[:, None, :].expand(-1, len(rows), -1), 2, jc)
        p = p.masked_fill(~valid, float("-inf"))
        r = s - c[:, r0:r1]  # (G, R) slash keys each row takes
        r_max = int(r.max())
        if r_max == 0:
            continue
        kk = min(r_max, m)
        top = p.topk(kk, dim=-1)
        take = torch.arange(kk, device=dev) < r[..., None]
        keys = torch.where(take, torch.gather(j, 2, top.indices), -1)
        cut = torch.gather(top.values, 2, (r - 1).clamp(0, kk - 1)[..., None]).squeeze(-1)
        ok = (r == 0) | ((r <= kk) & torch.isfinite(cut) & (cut > bound[:, None] + 1e-6))
        sel[:, r0:r1, :kk] = torch.where(ok[..., None], keys, -1)
        for g, t in (~ok).nonzero().tolist():
            fallback.append((g, r0 + t))
    if fallback:
        _fallback_rows(sel, fallback, vertical, slash, is_v, shift, s, n)
    band = _band_width(sel, is_v, s, full)
    off = rows_all[None, :, None] - sel
    extra = (sel >= 0) & (off >= band[:, None, None])
    e = int(extra.sum(dim=-1).max()) if n else 0
    order = torch.sort((~extra).to(torch.int8), dim=-1, stable=True).indices[..., :e]
    extras = torch.where(torch.gather(extra, 2, order), torch.gather(sel, 2, order), -1)
    return VSIndex(verticals.sort(dim=-1).values, band, extras, full, len(fallback))


def _fallback_rows(sel, rows, vertical, slash, is_v, shift, s, n, chunk: int = 256):
    """Fill ``sel`` for (g, i) rows by the reference rule on their whole row."""
    dev = sel.device
    by_head = {}
    for g, i in rows:
        by_head.setdefault(g, []).append(i)
    keys = torch.arange(n, device=dev)
    for g, idx in by_head.items():
        for c0 in range(0, len(idx), chunk):
            ii = torch.tensor(idx[c0 : c0 + chunk], device=dev)
            off = (ii[:, None] - keys[None, :] + shift).clamp_min(0)
            vis = keys[None, :] <= ii[:, None]
            keep = vertical_slash_select(vertical[g], slash[g], off, s, vis)  # (r, n)
            keep &= vis & ~is_v[g][None, :]
            order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :s]
            sel[g, ii] = torch.where(torch.gather(keep, 1, order), order, -1)


def _band_width(sel, is_v, s: int, dense_rows: int) -> torch.Tensor:
    """Per head the widest band 0..w−1 of offsets whose non-vertical keys every row after the dense
    rows keeps."""
    G, n, _ = sel.shape
    dev = sel.device
    width = s + 2
    rows = torch.arange(n, device=dev)
    off = rows[None, :, None] - sel
    off = torch.where((sel >= 0) & (off < width), off, width)
    cov = torch.zeros((G, n, width + 1), dtype=torch.bool, device=dev).scatter_(2, off, True)[..., :width]
    o = torch.arange(width, device=dev)
    j = rows[:, None] - o[None, :]  # (n, width)
    cov |= (j < 0)[None]
    cov |= torch.gather(is_v[:, None, :].expand(-1, n, -1), 2, j.clamp_min(0)[None].expand(G, -1, -1)) & (j >= 0)[None]
    first = torch.where(~cov, o, width).amin(dim=-1)[:, dense_rows:]  # (G, n − dense_rows)
    return first.amin(dim=-1) if first.shape[1] else torch.zeros(G, dtype=torch.long, device=dev)


def vs_index_mask(index: VSIndex, n: int) -> torch.Tensor:
    """(G, n, n) dense boolean of the keys an index keeps (for tests and the blocks brute force)."""
    G = index.band.shape[0]
    dev = index.band.device
    i = torch.arange(n, device=dev)
    keep = torch.zeros((G, n, n), dtype=torch.bool, device=dev)
    keep.scatter_(2, index.verticals[:, None, :].expand(-1, n, -1), True)
    keep[:, : index.dense_rows] = True
    keep &= (i[None, :] <= i[:, None])[None]
    is_v = torch.zeros((G, n), dtype=torch.bool, device=dev).scatter_(-1, index.verticals, True)
    off = i[:, None] - i[None, :]
    keep[:, index.dense_rows :] |= ((off[None] >= 0) & (off[None] < index.band[:, None, None]) & ~is_v[:, None, :])[
        :, index.dense_rows :
    ]
    if index.extras.shape[-1]:
        ex = index.extras
        hit = torch.zeros((G, n, n + 1), dtype=torch.bool, device=dev)
        hit.scatter_(2, torch.where(ex >= 0, ex, n), True)
        keep |= hit[..., :n]
    return keep


def _vertical_part(q, k, v, verticals, scale):
    n = q.shape[1]
    idx = verticals[..., None].expand(-1, -1, q.shape[-1])
    kv, vv = torch.gather(k, 1, idx), torch.gather(v, 1, idx)
    scores = torch.matmul(q, kv.transpose(-1, -2)) * scale  # (G, n, nv)
    rows = torch.arange(n, device=q.device)
    scores = scores.masked_fill(verticals[:, None, :] > rows[None, :, None], float("-inf"))
    return partial_softmax(scores, vv)


def _band_part(q, k, v, band, is_v, scale):
    """Keys i−w+1..i (not vertical) of every row i, a block of rows at a time: each block of B rows
    against its B+w−1 keys, one batched GEMM over blocks (the banded block kernel)."""
    G, n, dh = q.shape
    w = int(band.max())
    B = int(min(BLOCK, max(16, 1 << max(w - 1, 1).bit_length())))
    nb = -(-n // B)
    L = B + w - 1
    pad = (w - 1, nb * B - n)
    kw = F.pad(k, (0, 0, *pad)).unfold(1, L, B)  # (G, nb, dh, L)
    vw = F.pad(v, (0, 0, *pad)).unfold(1, L, B).transpose(-1, -2)  # (G, nb, L, dh)
    qb = F.pad(q, (0, 0, 0, nb * B - n)).reshape(G, nb, B, dh)
    scores = torch.matmul(qb, kw) * scale  # (G, nb, B, L)
    t = torch.arange(B, device=q.device)
    lpos = torch.arange(L, device=q.device)
    off = t[:, None] - lpos[None, :] + (w - 1)  # (B, L) offset i − j
    key = (torch.arange(nb, device=q.device) * B)[:, None] + lpos[None, :] - (w - 1)  # (nb, L)
    vpad = F.pad(is_v, (w - 1, nb * B - n), value=True).unfold(1, L, B)  # (G, nb, L)
    keep = (off >= 0)[None, None] & (off[None, None] < band[:, None, None, None]) & (key >= 0)[None, :, None, :]
    keep &= ~vpad[:, :, None, :]
    out, lse = partial_softmax(scores.masked_fill(~keep, float("-inf")), vw)
    return out.reshape(G, nb * B, dh)[:, :n], lse.reshape(G, nb * B)[:, :n]


def _extras_part(q, k, v, extras, scale, buffer_keys: int = 1 << 16):
    """Each row's own diagonal keys (q: (G, r, dh) rows, extras (G, r, e) their key indices into
    k, v (G, n, dh)): gathered into small reused buffers a few rows at a time (a fresh r·e·d_head
    buffer costs more in page faults than the gather itself), then scored and weighed as batched GEMMs."""
    G, n, dh = q.shape
    e = extras.shape[-1]
    rows = max(1, min(32, buffer_keys // max(1, G * e)))
    kf, vf = k.reshape(-1, dh), v.reshape(-1, dh)
    flat = (torch.arange(G, device=q.device) * k.shape[1])[:, None, None] + extras.clamp_min(0)
    out, lse = q.new_empty((G, n, dh)), q.new_empty((G, n))
    kbuf, vbuf = q.new_empty((G * rows * e, dh)), q.new_empty((G * rows * e, dh))
    counts = (extras >= 0).sum(dim=-1)  # extras are packed first: a chunk pads to its own longest row
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        ec = max(1, int(counts[:, r0 : r0 + r].max()))
        idx = flat[:, r0 : r0 + r, :ec].reshape(-1)
        ke = torch.index_select(kf, 0, idx, out=kbuf[: G * r * ec]).view(G, r, ec, dh)
        ve = torch.index_select(vf, 0, idx, out=vbuf[: G * r * ec]).view(G, r, ec, dh)
        scores = torch.einsum("grd,gred->gre", q[:, r0 : r0 + r], ke) * scale
        scores.masked_fill_(extras[:, r0 : r0 + r, :ec] < 0, float("-inf"))
        o, l_ = partial_softmax(scores[..., None, :], ve)
        out[:, r0 : r0 + r] = o.squeeze(-2)
        lse[:, r0 : r0 + r] = l_.squeeze(-1)
    return out, lse


def vertical_slash_attention(q, k, v, s: int, q_last: int, *, scale=None, index: VSIndex | None = None):
    """Vertical-slash attention of every query of causal heads (q, k, v: (B, H, n, dh)), whole scope.

    Row i attends to the keys ``vertical_slash_keys(S, 0..n−1, 0..n−1, s, q_last, causal)`` keeps
    (with the causal mask on top): the reference is ``softmax(masked_logits(S + causal, keep))·V``.
    The keys come from :func:`vertical_slash_index` (computed here from Q and K unless given); the
    vertical, band and per-row parts are computed apart and merged by log-sum-exp."""
    Bt, H, n, dh = q.shape
    scale = _scale(q, scale)
    qg, kg, vg = (x.reshape(Bt * H, n, dh) for x in (q, k, v))
    if index is None:
        index = vertical_slash_index(qg, kg, s, q_last, scale)
    d0 = index.dense_rows
    dense = F.scaled_dot_product_attention(
        qg[:, None, :d0], kg[:, None, :d0], vg[:, None, :d0], is_causal=True, scale=scale
    )
    if d0 == n:
        return dense.reshape(Bt, H, n, dh)
    parts = [_vertical_part(qg, kg, vg, index.verticals, scale)]  # the dense rows' share is dropped below
    if int(index.band.max()) > 0:
        is_v = torch.zeros((Bt * H, n), dtype=torch.bool, device=q.device).scatter_(-1, index.verticals, True)
        parts.append(_band_part(qg, kg, vg, index.band, is_v, scale))
    parts = [(o[:, d0:], lse[:, d0:]) for o, lse in parts]
    if index.extras.shape[-1]:
        parts.append(_extras_part(qg[:, d0:], kg, vg, index.extras[:, d0:], scale))
    return torch.cat([dense[:, 0], merge(parts)], dim=1).reshape(Bt, H, n, dh)


def vs_blocks(index: VSIndex, n: int, block: int = BLOCK) -> torch.Tensor:
    """(G, n/block, n/block) key blocks each query block touches under ``index``, from its parts
    (no dense mask): the dense rows' causal blocks, a vertical column's block for every query block
    that reaches it, the band's blocks that hold a non-vertical key within w of a row of the block,
    each extra key's block."""
    G = index.band.shape[0]
    dev = index.band.device
    nb = -(-n // block)
    touched = torch.zeros((G, nb, nb), dtype=torch.bool, device=dev)
    kb = index.verticals // block  # a vertical v is used by every query block whose last row is ≥ v
    qb = torch.arange(nb, device=dev)
    touched |= torch.zeros_like(touched).scatter_(2, kb[:, None, :].expand(-1, nb, -1), True) & (
        qb[None, :, None] >= qb[None, None, :]
    )
    # band: block (a, b) holds a band key iff a non-vertical key lies in [max(b·B, a·B−w+1), min(b_end, a_end)]
    is_v = torch.zeros((G, n), dtype=torch.bool, device=dev).scatter_(-1, index.verticals, True)
    nonv = torch.cat([torch.zeros((G, 1), dtype=torch.long, device=dev), (~is_v).long().cumsum(-1)], dim=-1)
    w = index.band
    a = qb[:, None].expand(nb, nb)
    b = qb[None, :].expand(nb, nb)
    a_end = torch.clamp((a + 1) * block, max=n) - 1
    b_end = torch.clamp((b + 1) * block, max=n) - 1
    lo = torch.maximum(b * block, a * block - w[:, None, None] + 1)
    hi = torch.minimum(b_end, a_end).expand(G, -1, -1)
    ok = (hi >= lo) & (w[:, None, None] > 0)
    cnt = torch.gather(nonv, 1, (hi + 1).clamp(0, n).reshape(G, -1)) - torch.gather(
        nonv, 1, lo.clamp(0, n).reshape(G, -1)
    )
    touched |= ok & (cnt.reshape(G, nb, nb) > 0)
    dense_hi = torch.clamp(a_end[:, 0], max=index.dense_rows - 1)  # the dense rows: every key up to the row
    touched |= ((a[:, 0] * block < index.dense_rows)[:, None] & (qb[None, :] * block <= dense_hi[:, None]))[None]
    if index.extras.shape[-1]:
        ex = index.extras
        rows = torch.arange(n, device=dev)[None, :, None].expand_as(ex) // block
        flat = torch.where(ex >= 0, rows * nb + ex // block, nb * nb)
        hit = torch.zeros((G, nb * nb + 1), dtype=torch.bool, device=dev).scatter_(1, flat.reshape(G, -1), True)
        touched |= hit[:, : nb * nb].reshape(G, nb, nb)
    return touched


# ---------------------------------------------------------------------------------------------
# view scope: the exact keys outside the view, then Nyström or the paper's map on the view


def _outside(q, k, v, q0, k1, causal, scale):
    """(out, lse) of the view's queries q[q0:] over the keys outside the view (k1..), exact."""
    n = q.shape[-2]
    if k1 >= n:
        shape = q[..., q0:, :].shape
        return q.new_zeros(shape), q.new_full(shape[:-1], float("-inf"))
    if causal:  # key k1 + t' is visible to query q0 + t iff t' ≤ t (k1 = q0 in a causal view)
        if k1 != q0:
            raise ValueError(f"a causal view needs its keys to end where its queries start ({k1} ≠ {q0})")
    return sdpa_lse(q[..., q0:, :], k[..., k1:, :], v[..., k1:, :], scale, causal)


def _before(q, k, v, q0, causal, scale):
    """Exact attention of the queries before the view (0..q0−1)."""
    if causal:
        return F.scaled_dot_product_attention(
            q[..., :q0, :], k[..., :q0, :], v[..., :q0, :], is_causal=True, scale=scale
        )
    return F.scaled_dot_product_attention(q[..., :q0, :], k, v, scale=scale)


def vertical_slash_view_keys(q, k, s: int, q_last: int, *, query_range, key_range, scale=None, block: int = BLOCK):
    """Vertical-slash on a view (every key of the view visible to every query of it, the ``prefix``
    and ``all`` views), for q, k (G, n, dh): (verticals (G, ⌈s/2⌉) view keys every view row keeps,
    extras (G, nq, s − ⌈s/2⌉) each view row's diagonal keys), exactly the keys of
    ``vertical_slash_keys(X_view, q_pos, k_pos, s, q_last)``. Rows are certified against the best
    candidate diagonals of their block as in :func:`vertical_slash_index`; the rest take the
    reference rule on their whole row."""
    n = q.shape[1]
    q0, q1, k0, k1 = _check_view(n, query_range, key_range, False)
    G, d, nq = q.shape[0], k1 - k0, q1 - q0
    if not 1 <= s <= d:
        raise ValueError(f"s={s} keys of {d}")
    scale = _scale(q, scale)
    dev = q.device
    ql = min(int(q_last), nq)
    last_pos = np.arange(q1 - ql, q1)
    Xl = torch.matmul(q[:, q1 - ql : q1], k[:, k0:k1].transpose(-1, -2)) * scale
    vertical, slash, _ = vertical_slash_pattern(Xl, last_pos, np.arange(k0, k1), ql, None)
    o_min = q0 - (k1 - 1)  # the view's smallest offset i − j; the pattern's index of offset o is o − lo
    lo = (q1 - ql) - (k1 - 1)
    n_vert = math.ceil(s / 2)
    r = s - n_vert
    verticals = vertical.topk(n_vert, dim=-1).indices
    is_v = torch.zeros((G, d), dtype=torch.bool, device=dev).scatter_(-1, verticals, True)
    tiny = torch.finfo(slash.dtype).tiny
    s_norm = slash / slash.amax(dim=-1, keepdim=True).clamp_min(tiny)
    v_norm = vertical / vertical.amax(dim=-1, keepdim=True).clamp_min(tiny)
    width = (q1 - 1) - o_min + 1
    # a[o − o_min] for every offset of the view (offsets the last rows never reach have no mass)
    a = torch.zeros((G, width), dtype=s_norm.dtype, device=dev)
    src0 = max(o_min, lo)
    a[:, src0 - o_min :] = 0.99 * s_norm[:, src0 - lo : src0 - lo + width - (src0 - o_min)]
    vt = 1e-3 * v_norm
    vt_top = vt.masked_fill(is_v, float("-inf")).amax(dim=-1)
    extras = torch.full((G, nq, max(r, 1)), -1, dtype=torch.long, device=dev)
    fallback = []
    for r0 in range(q0, q1, block):
        r1 = min(r0 + block, q1)
        rows = torch.arange(r0, r1, device=dev)
        a0, a1 = r0 - (k1 - 1) - o_min, r1 - 1 - o_min + 1  # offsets the block's rows can reach
        m = min(a1 - a0, r + n_vert + block + 32)
        if r == 0:
            break
        if m >= a1 - a0:
            cand = torch.arange(a0, a1, device=dev).expand(G, -1)
            bound = torch.full((G,), float("-inf"), device=dev, dtype=a.dtype)
        else:
            cand = a0 + a[:, a0:a1].topk(m, dim=-1).indices
            bound = a[:, a0:a1].scatter(-1, cand - a0, float("-inf")).amax(dim=-1) + vt_top
        j = rows[None, :, None] - (cand[:, None, :] + o_min) - k0  # (G, R, m) view key index
        jc = j.clamp(0, d - 1)
        valid = (j >= 0) & (j < d) & ~torch.gather(is_v[:, None, :].expand(-1, len(rows), -1), 2, jc)
        p = a.gather(1, cand)[:, None, :] + torch.gather(vt[:, None, :].expand(-1, len(rows), -1), 2, jc)
        p = p.masked_fill(~valid, float("-inf"))
        kk = min(r, p.shape[-1])
        top = p.topk(kk, dim=-1)
        keys = torch.gather(j, 2, top.indices)
        cut = top.values[..., -1]
        ok = (kk == r) & torch.isfinite(cut) & (cut > bound[:, None] + 1e-6)
        extras[:, r0 - q0 : r1 - q0, :kk] = torch.where(ok[..., None], keys, -1)
        for g, t in (~ok).nonzero().tolist():
            fallback.append((g, r0 + t))
    if fallback and r:
        keys = torch.arange(d, device=dev)
        pad = torch.cat([slash.new_zeros((G, lo - o_min)), slash], dim=-1)  # offsets the last rows never reach: no mass
        by_head = {}
        for g, i in fallback:
            by_head.setdefault(g, []).append(i)
        for g, idx in by_head.items():
            for c0 in range(0, len(idx), 256):
                ii = torch.tensor(idx[c0 : c0 + 256], device=dev)
                off = (ii[:, None] - k0) - keys[None, :] - o_min
                keep = vertical_slash_select(vertical[g], pad[g], off, s) & ~is_v[g][None, :]
                order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :r]
                extras[g, ii - q0, :r] = torch.where(torch.gather(keep, 1, order), order, -1)
    return verticals.sort(dim=-1).values, extras[..., :r]


def vertical_slash_view_attention(q, k, v, s: int, q_last: int, *, query_range, key_range, causal: bool, scale=None):
    """Vertical-slash on the view block, everything else exact (the view scope of
    :func:`peer_attention` with a ``vertical_slash`` PeerSpec): the view's rows attend to the
    gathered vertical keys and their own diagonal keys of the view, merged by log-sum-exp with
    their exact keys outside the view; queries before the view are exact."""
    Bt, H, n, dh = q.shape
    q0, q1, k0, k1 = _check_view(n, query_range, key_range, causal)
    scale = _scale(q, scale)
    qg, kg, vg = (x.reshape(Bt * H, n, dh) for x in (q, k, v))
    verticals, extras = vertical_slash_view_keys(
        qg, kg, s, q_last, query_range=query_range, key_range=key_range, scale=scale
    )
    Qv = qg[:, q0:q1]
    idx = verticals[..., None].expand(-1, -1, dh)
    parts = [
        partial_softmax(torch.matmul(Qv, torch.gather(kg, 1, idx).transpose(-1, -2)) * scale, torch.gather(vg, 1, idx))
    ]
    if extras.shape[-1]:
        parts.append(_extras_part(Qv, kg, vg, extras, scale))
    o_out, lse_out = _outside(q, k, v, q0, k1, causal, scale)
    parts.append((o_out.reshape(Bt * H, q1 - q0, dh), lse_out.reshape(Bt * H, q1 - q0)))
    rows = merge(parts).reshape(Bt, H, q1 - q0, dh)
    return torch.cat([_before(q, k, v, q0, causal, scale), rows], dim=2) if q0 else rows


def nystrom_attention(q, k, v, m: int, *, pinv: str, query_range, key_range, causal: bool, scale=None):
    """Nyström attention on the view block (``m`` landmarks), everything else exact: the output of
    :func:`peer_attention` with a ``nystrom`` PeerSpec, by the landmark GEMMs in the factored order
    (never the (nq, d) probability block). The view's queries weigh the view against their keys
    outside it by α = sigmoid(log Ẑ_view − lse_outside), as the reference does."""
    n = q.shape[-2]
    q0, q1, k0, k1 = _check_view(n, query_range, key_range, causal)
    scale = _scale(q, scale)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32  # as the reference: float32 at least
    qf, kf, vf = q.to(work), k.to(work), v.to(work)
    Qv, Kv, Vv = qf[..., q0:q1, :], kf[..., k0:k1, :], vf[..., k0:k1, :]
    nq, d = q1 - q0, k1 - k0
    Aq = torch.from_numpy(segments(nq, m)).to(qf)
    Ak = torch.from_numpy(segments(d, m)).to(qf)
    Ql, Kl = Aq @ Qv, Ak @ Kv
    K1 = scale * Qv @ Kl.transpose(-1, -2)
    K2 = scale * Ql @ Kl.transpose(-1, -2)
    K3 = scale * Ql @ Kv.transpose(-1, -2)
    Z = _pinv(torch.softmax(K2, dim=-1), pinv)
    view = torch.softmax(K1, dim=-1) @ (Z @ (torch.softmax(K3, dim=-1) @ Vv))
    log_z = landmark_log_z(K1, K2, K3, torch.from_numpy(segment_sizes(d, m)).to(qf), segment_of(nq, m))
    out_o, lse_o = _outside(qf, kf, vf, q0, k1, causal, scale)
    alpha = torch.sigmoid(log_z - lse_o)[..., None]
    rows = (1 - alpha) * out_o + alpha * view
    out = torch.cat([_before(qf, kf, vf, q0, causal, scale), rows], dim=-2) if q0 else rows
    return out.to(q.dtype)


def partial_attention(q, k, v, T, W, b, *, query_range, key_range, causal: bool, scale=None):
    """The paper's estimator on the view block, everything else exact: compute the s scores
    ``a_T = scale·Q K_Tᵀ``, the map ``Â = a_T Wᵀ + b``, the softmax and ``P·V`` over the view's keys,
    merged by log-sum-exp with the view queries' exact keys outside the view; queries before the
    view are exact. The reference is ``softmax(partial_scores(Q, K, map) + mask)·V``.
    ``T`` (H, s), ``W`` (H, d, s), ``b`` (H, d) (−inf: a key the map never attends to). When W is
    the identity on T and b is −inf elsewhere (``subset_only``), only the s keys are gathered."""
    Bt, H, n, dh = q.shape
    q0, q1, k0, k1 = _check_view(n, query_range, key_range, causal)
    scale = _scale(q, scale)
    T = torch.as_tensor(T, device=q.device, dtype=torch.long)
    W = torch.as_tensor(W, device=q.device).to(q.dtype)
    b = torch.as_tensor(b, device=q.device).to(q.dtype)
    Qv, Kv, Vv = q[..., q0:q1, :], k[..., k0:k1, :], v[..., k0:k1, :]
    idx = T[None, :, :, None].expand(Bt, -1, -1, dh)
    kT = torch.gather(Kv, 2, idx)
    a_T = torch.matmul(Qv, kT.transpose(-1, -2)) * scale  # nq·s·dh
    if is_subset_only(T, W, b):
        view = partial_softmax(a_T, torch.gather(Vv, 2, idx))  # nq·s·dh
    else:
        A = torch.matmul(a_T, W.transpose(-1, -2)) + b[None, :, None, :]  # nq·s·d
        view = partial_softmax(A, Vv)  # nq·d·dh
    rows = merge([view, _outside(q, k, v, q0, k1, causal, scale)])
    return torch.cat([_before(q, k, v, q0, causal, scale), rows], dim=-2) if q0 else rows


def is_subset_only(T, W, b) -> bool:
    """W is the identity on T and b is −inf off T and 0 on it: softmax over the s keys alone."""
    H, d, s = W.shape
    eye = torch.zeros_like(W).scatter_(1, T[:, None, :], 1.0)
    on_t = torch.zeros((H, d), dtype=torch.bool, device=W.device).scatter_(1, T, True)
    return bool(torch.equal(W, eye) and torch.isneginf(b[~on_t]).all() and (b[on_t] == 0).all())


# ---------------------------------------------------------------------------------------------
# blocks touched


def causal_blocks(n: int, block: int = BLOCK) -> int:
    """Key blocks exact causal attention touches per head: query block a uses key blocks 0..a."""
    nb = -(-n // block)
    return nb * (nb + 1) // 2


def blockmask_blocks(block_mask) -> torch.Tensor:
    """Key blocks a FlexAttention BlockMask visits, per (batch, head): partial blocks plus full ones."""
    total = block_mask.kv_num_blocks.sum(dim=-1)
    if block_mask.full_kv_num_blocks is not None:
        total = total + block_mask.full_kv_num_blocks.sum(dim=-1)
    return total


def view_blocks(n: int, query_range, key_range, causal: bool, view_keys=None, block: int = BLOCK) -> torch.Tensor:
    """(H or 1,) key blocks a view-scope method touches: exact attention outside the view, and
    inside it every view key (``view_keys`` None: Nyström, a dense map) or only the keys
    ``view_keys`` (H, s) (``subset_only``), for every query of the view."""
    q0, q1, k0, k1 = _check_view(n, query_range, key_range, causal)
    nb = -(-n // block)
    a = torch.arange(nb)
    a_lo, a_hi = a * block, torch.clamp((a + 1) * block, max=n) - 1
    b_lo = a * block
    # outside the view: rows before q0 see keys ≤ row (causal) or all; view rows see keys ≥ k1 (≤ row)
    pre = a_lo < q0
    pre_touch = pre[:, None] & ((b_lo[None, :] <= torch.clamp(a_hi, max=q0 - 1)[:, None]) if causal else True)
    vrow = a_hi >= q0
    lo_k = torch.clamp((a + 1) * block, max=n) - 1  # the last key of block b
    out_touch = vrow[:, None] & (lo_k[None, :] >= k1) & ((b_lo[None, :] <= a_hi[:, None]) if causal else True)
    base = pre_touch | out_touch
    if view_keys is None:
        inview = vrow[:, None] & (b_lo[None, :] < k1)
        return (base | inview).sum().reshape(1)
    kb = torch.as_tensor(view_keys) // block  # (H, s)
    hit = torch.zeros((kb.shape[0], nb), dtype=torch.bool).scatter_(1, kb, True)
    return (base[None] | (vrow[None, :, None] & hit[:, None, :])).sum(dim=(1, 2))
