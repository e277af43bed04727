"""The arithmetic of attention shared by the capture and partial backends: scale · Q Kᵀ, grouped
key/value heads, and the three ways to finish a layer (eager, streamed eager, SDPA)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # Same head order as transformers' repeat_kv: kv head j serves query heads j*n_rep..(j+1)*n_rep-1.
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def scaled_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """scale · Q Kᵀ (batch, heads, q, k), the scale fused into the batched product (one pass over
    the n×n result instead of two)."""
    B, H, n, d = query.shape
    q = query.reshape(B * H, n, d)
    k = key.reshape(B * H, key.shape[2], d)
    return torch.baddbmm(q.new_zeros(()), q, k.transpose(1, 2), beta=0, alpha=scaling).view(B, H, n, key.shape[2])


def expand_heads(query, key, value, scaling):
    """The default scale, and keys/values repeated to one per query head (grouped-query attention)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    return repeat_kv(key, n_rep), repeat_kv(value, n_rep), scaling


def mask_is_plain(mask: torch.Tensor, causal: bool) -> bool:
    """Whether an additive or boolean attention mask over square scores hides exactly the future
    keys (``causal``) or nothing: no padding, no window. Additive hidden entries must be the eager
    −inf / dtype-min."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    visible = mask if mask.dtype == torch.bool else mask == 0
    want = torch.ones(n, n, dtype=torch.bool, device=mask.device)
    if causal:
        want = want.tril_()
    if not bool((visible == want).all()):
        return False
    return mask.dtype == torch.bool or bool((visible | (mask <= torch.finfo(mask.dtype).min / 2)).all())


def sdpa_attention(query, key, value, mask, scaling: float, causal: bool = False):
    """The output of plain attention (no softcap, bias or sink) from SDPA, as (batch, n, heads, d).
    ``causal``: ``mask`` is the plain causal mask, which SDPA then applies itself (``is_causal``),
    skipping the keys after each query instead of adding a mask to all n² of them."""
    if causal:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous()
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def quadrants(n: int, m: int) -> list[tuple[slice, slice]]:
    """The four blocks of an n × m score matrix, split at n // 2 queries and m // 2 keys: a view
    (``prefix``: queries n // 2.., keys ..n // 2) is a union of them."""
    rows, cols = (slice(0, n // 2), slice(n // 2, n)), (slice(0, m // 2), slice(m // 2, m))
    return [(r, c) for r in rows for c in cols if r.stop > r.start and c.stop > c.start]


def block_scores(query, key, scaling: float, store, blocks=None):
    """scale · Q_b K_bᵀ of each sequence b, handed to ``store(b, S_b)`` in one (heads, n, m) buffer
    reused for every b. ``blocks``: the (query slice, key slice) blocks of :func:`quadrants` to
    compute (None: the whole matrix, in one product), the others left unset; each block is its
    own product of Q and K's rows, the same whichever other blocks are computed, so a capture that
    takes one block sees the bits a capture of the whole matrix would (with ``blocks`` =
    every quadrant) see there."""
    B, H, n, _ = query.shape
    m = key.shape[2]
    buf = query.new_empty((H, n, m))  # one sequence's scores: small enough to stay in cache
    for b in range(B):
        if blocks is None:
            torch.baddbmm(buf, query[b], key[b].transpose(1, 2), beta=0, alpha=scaling, out=buf)
        else:
            for rs, cs in blocks:
                part = torch.baddbmm(
                    buf.new_zeros(()), query[b][:, rs], key[b][:, cs].transpose(1, 2), beta=0, alpha=scaling
                )
                buf[:, rs, cs] = part
        store(b, buf)


def streamed_attention(query, key, value, mask, scaling: float, store):
    """Eager attention of one layer, one sequence at a time, handing its scores to ``store(b, S_b)``:
    S_b = scale · Q_b K_bᵀ into one (heads, n, m) buffer reused for every b, stored, then
    softmax(S_b + mask) V_b. Same arithmetic as eager attention (float32 softmax), without a
    whole-batch n×n round trip through memory."""
    B, H, n, _ = query.shape
    m = key.shape[2]
    buf = query.new_empty((H, n, m))  # one sequence's scores: small enough to stay in cache
    out = query.new_empty((B, H, n, value.shape[-1]))
    for b in range(B):
        torch.baddbmm(buf, query[b], key[b].transpose(1, 2), beta=0, alpha=scaling, out=buf)
        store(b, buf)
        if mask is not None:
            buf.add_(mask[b if mask.shape[0] > 1 else 0])
        torch.bmm(torch.softmax(buf, dim=-1), value[b], out=out[b])
    return out.transpose(1, 2).contiguous()


def finish_attention(module, scores, mask, value, dtype, dropout=0.0, sinks=None):
    """Eager attention after the scores: additive mask, float32 softmax, dropout, P·V.

    With ``sinks`` (one logit per head), the softmax runs over the keys plus a sink column that is
    then dropped, as gpt-oss's eager attention does: P = softmax([S + mask, s_h])[..., :-1].
    """
    weights = scores if mask is None else scores + mask
    if sinks is None:
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(dtype)
    else:
        sink = sinks.reshape(1, -1, 1, 1).to(weights.dtype).expand(weights.shape[0], -1, weights.shape[-2], 1)
        combined = torch.cat([weights, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        weights = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights
