"""``partial`` attention: compute scores for a subset of keys and reconstruct the rest.

Registered through ``transformers.AttentionInterface`` under the name ``partial``. Each attention
module that should be approximated carries a :class:`PartialMap` as the attribute
``eigenattn_partial`` (see :func:`attach`). For the queries ``Q`` and keys ``K`` of the view the
map was fitted on, the backend

1. gathers the keys at ``T`` (per query head, after RoPE and the grouped-query repeat),
2. computes ``A_T = scale · Q K_Tᵀ`` (cost n·s·d_head instead of n·d·d_head),
3. reconstructs ``Â = A_T Wᵀ + b`` (cost n·s·d),
4. applies the model's mask, the softmax and V as eager attention does.

Scores **outside the view** (queries outside ``Q``, or keys outside ``K`` for queries in ``Q``)
are computed exactly: the statistics say nothing about them. For the ``all`` view that is
nothing; for the ``prefix`` view (queries in the second half against keys in the first half) the
first half of the queries and the keys of the second half stay exact. A module without a map
runs exact eager attention. The mask is added after the reconstruction, so masked entries stay
masked; for a causal model a map is only accepted when every key of the view precedes every
query of the view (the ``prefix`` view), so no reconstructed score can draw on a future key.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from eigenattn.capture.attention import expand_heads, finish_attention
from eigenattn.capture.interface import IGNORED_KWARGS, check_kwargs, register_backend
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.estimators import fit_heads
from eigenattn.reconstruction.peer_attention import PEER_ATTR, PeerSpec, peer_attention

PARTIAL_IMPL = "partial"
ATTR = "eigenattn_partial"
LINFORMER_ATTR = "eigenattn_linformer"
UNIFORM_ATTR = "eigenattn_uniform"
# a per-head plan (plan_attention.LayerPlan, called as the layer's attention) and a per-head probe
# (plan_attention.HeadProbe: output gates and attention statistics of exact attention)
PLAN_ATTR = "eigenattn_plan"
PROBE_ATTR = "eigenattn_probe"


class Linformer(nn.Module):
    """Sequence projections E, F (s × n) of one layer, shared by its heads."""

    def __init__(self, n: int, s: int, identity: bool = False):
        super().__init__()
        if identity:
            if s != n:
                raise ValueError("an identity Linformer projection needs s = n")
            E = torch.eye(n)
        else:
            E = torch.randn(s, n) / math.sqrt(n)
        self.E = nn.Parameter(E.clone())
        self.F = nn.Parameter(E.clone() if identity else torch.randn(s, n) / math.sqrt(n))

    def extra_repr(self) -> str:
        return f"s={self.E.shape[0]}, n={self.E.shape[1]}"


class PartialMap(nn.Module):
    """(T, W, b) of every query head of one layer, for one view of sequences of length ``seq_len``.

    ``T``: (H, s) key positions within the view; ``W``: (H, d, s); ``b``: (H, d). ``W`` and ``b``
    are parameters, frozen unless ``trainable`` (``-inf`` entries of ``b``, as in
    ``subset_only``, are kept as a fixed buffer mask).
    """

    def __init__(self, T, W, b, *, seq_len: int, query_range, key_range, causal: bool = False, trainable: bool = False):
        super().__init__()
        T = torch.as_tensor(np.asarray(T), dtype=torch.long)
        W = torch.tensor(np.asarray(W), dtype=torch.float32)
        b = torch.tensor(np.asarray(b), dtype=torch.float32)
        q0, q1 = map(int, query_range)
        k0, k1 = map(int, key_range)
        d = k1 - k0
        if T.ndim != 2 or W.shape != (T.shape[0], d, T.shape[1]) or b.shape != (T.shape[0], d):
            raise InputError(
                "partial map (T, W, b)",
                f"shapes T {tuple(T.shape)}, W {tuple(W.shape)}, b "
                f"{tuple(b.shape)} do not match H heads, d={d} keys of the view and s subset keys",
                "fit the map from the view's statistics (maps_from_stats)",
            )
        if T.numel() and (int(T.min()) < 0 or int(T.max()) >= d):
            raise InputError(
                "partial map (T, W, b)",
                f"subset positions must lie in 0..{d - 1} (the view's keys)",
                "fit the map from the view's statistics (maps_from_stats)",
            )
        if causal and k1 > q0 + 1:
            raise ConfigError(
                "eigen.views",
                f"keys {k0}..{k1 - 1} reach past the first query {q0} of the view; on a "
                "causal model a reconstruction would read future keys",
                "use the prefix view for causal models",
            )
        self.seq_len = int(seq_len)
        self.qs, self.ks = slice(q0, q1), slice(k0, k1)
        self.register_buffer("T", T, persistent=True)
        neg = torch.isneginf(b)
        self.register_buffer("neg_inf", neg, persistent=True)
        self.W = nn.Parameter(W, requires_grad=trainable)
        self.b = nn.Parameter(torch.where(neg, torch.zeros_like(b), b), requires_grad=trainable)
        # subset_only (W = I on T, -inf elsewhere) over the whole matrix runs as true sparse attention
        eye = torch.zeros_like(W)
        if T.numel():
            eye.scatter_(1, T[:, None, :], 1.0)
        self.sparse = bool(
            not trainable
            and int(neg.sum()) == T.shape[0] * (d - T.shape[1])
            and torch.equal(W, eye)
            and (q0, q1, k0, k1) == (0, seq_len, 0, seq_len)
        )

    @property
    def heads(self) -> int:
        return self.T.shape[0]

    @property
    def subset_size(self) -> int:
        return self.T.shape[1]

    def bias(self) -> torch.Tensor:
        return self.b.masked_fill(self.neg_inf, float("-inf"))

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, s={self.subset_size}, d={self.ks.stop - self.ks.start}, seq_len={self.seq_len}, "
            f"queries={self.qs.start}..{self.qs.stop - 1}, keys={self.ks.start}..{self.ks.stop - 1}"
        )


def partial_scores(query: torch.Tensor, key: torch.Tensor, pm: PartialMap, scaling: float) -> torch.Tensor:
    """Scores (B, H, n, n) with the view block reconstructed from the keys at T, the rest exact."""
    B, H, n, dh = query.shape
    if n != pm.seq_len or key.shape[-2] != pm.seq_len:
        raise InputError(
            "partial attention input",
            f"the map was fitted for seq_len {pm.seq_len}, but the input has {n} queries and {key.shape[-2]} keys",
            f"use inputs of exactly {pm.seq_len} tokens (no KV cache) or refit the statistics at this length",
        )
    if pm.heads != H:
        raise InputError(
            "partial attention input",
            f"the map has {pm.heads} heads, the layer has {H}",
            "fit the map from statistics of this model",
        )
    qs, ks = pm.qs, pm.ks
    q_view = query[:, :, qs]
    k_view = key[:, :, ks]
    idx = pm.T[None, :, :, None].expand(B, -1, -1, dh)
    k_sub = torch.gather(k_view, 2, idx)  # (B, H, s, dh)
    a_sub = torch.matmul(q_view, k_sub.transpose(-1, -2)) * scaling  # n·s·dh
    W = pm.W.to(query.dtype)
    a_hat = torch.matmul(a_sub, W.transpose(-1, -2)) + pm.bias().to(query.dtype)[None, :, None, :]  # n·s·d
    cols = []
    if ks.start > 0:
        cols.append(torch.matmul(q_view, key[:, :, : ks.start].transpose(-1, -2)) * scaling)
    cols.append(a_hat)
    if ks.stop < n:
        cols.append(torch.matmul(q_view, key[:, :, ks.stop :].transpose(-1, -2)) * scaling)
    rows = []
    if qs.start > 0:
        rows.append(torch.matmul(query[:, :, : qs.start], key.transpose(-1, -2)) * scaling)
    rows.append(torch.cat(cols, dim=-1) if len(cols) > 1 else a_hat)
    if qs.stop < n:
        rows.append(torch.matmul(query[:, :, qs.stop :], key.transpose(-1, -2)) * scaling)
    return torch.cat(rows, dim=-2) if len(rows) > 1 else rows[0]


def partial_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention backend (see the module docstring); exact eager attention where no map is set."""
    # Softcapping, position biases and sinks are not implemented here: refuse them, never drop them.
    check_kwargs(module, kwargs, IGNORED_KWARGS, PARTIAL_IMPL)
    key, value, scaling = expand_heads(query, key, value, scaling)
    layer_plan = getattr(module, PLAN_ATTR, None)
    if layer_plan is not None:
        return layer_plan(module, query, key, value, attention_mask, scaling, dropout)
    peer = getattr(module, PEER_ATTR, None)
    if peer is not None:
        return peer_attention(module, query, key, value, attention_mask, scaling, dropout, peer)
    pm = getattr(module, ATTR, None)
    lf = getattr(module, LINFORMER_ATTR, None)
    mask = attention_mask
    if getattr(module, UNIFORM_ATTR, False):  # order-free floor: every visible key weighs the same
        scores = query.new_zeros(*query.shape[:-1], key.shape[-2])
    elif lf is not None:  # Linformer: keys and values projected along the sequence (no key mask possible)
        if mask is not None and bool((mask < 0).any()):
            raise InputError(
                "linformer attention input",
                "linformer attention cannot apply a padding or causal mask",
                "use unpadded inputs of a bidirectional model",
            )
        if key.shape[-2] != lf.E.shape[1]:
            raise InputError(
                "linformer attention input",
                f"linformer projections are for {lf.E.shape[1]} tokens, the input has {key.shape[-2]}",
                f"use inputs of exactly {lf.E.shape[1]} tokens",
            )
        key = torch.matmul(lf.E.to(key.dtype), key)
        value = torch.matmul(lf.F.to(value.dtype), value)
        scores, mask = torch.matmul(query, key.transpose(2, 3)) * scaling, None
    elif pm is None:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    elif pm.sparse:  # subset_only: attend to the keys at T only
        if query.shape[-2] != pm.seq_len:
            raise InputError(
                "partial attention input",
                f"the map was fitted for seq_len {pm.seq_len}, the input has {query.shape[-2]} tokens",
                f"use inputs of exactly {pm.seq_len} tokens",
            )
        idx = pm.T[None, :, :, None].expand(query.shape[0], -1, -1, query.shape[-1])
        key, value = torch.gather(key, 2, idx), torch.gather(value, 2, idx)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if mask is not None:
            mask = torch.gather(
                mask.expand(query.shape[0], pm.heads, -1, -1),
                3,
                pm.T[None, :, None, :].expand(query.shape[0], -1, mask.shape[-2], -1),
            )
    else:
        scores = partial_scores(query, key, pm, scaling)
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
    out, weights = finish_attention(module, scores, mask, value, query.dtype, dropout)
    probe = getattr(module, PROBE_ATTR, None)
    if probe is not None:
        probe.record(weights)
        out = out * probe.gate.to(out.dtype)[None, None, :, None]
    return out, weights


def register() -> str:
    """Register the ``partial`` attention and mask functions (idempotent); return the name."""
    return register_backend(PARTIAL_IMPL, partial_attention_forward)


def attention_modules(model) -> dict[int, nn.Module]:
    """The self-attention modules of a transformers model, by layer index."""
    out = {}
    for _, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if idx is not None and any(hasattr(mod, a) for a in ("q_proj", "query", "Wqkv")):
            out[int(idx)] = mod
    if not out:
        raise InputError(
            type(model).__name__,
            "found no attention modules with a layer_idx",
            "use a transformers model whose attention modules carry layer_idx",
        )
    return out


def _set_per_layer(model, items: dict, attr: str, what: str) -> list[int]:
    """Set ``attr`` to ``items[i]`` on the attention module of each layer i (replacing any)."""
    mods = attention_modules(model)
    bad = sorted(set(items) - set(mods))
    if bad:
        raise InputError(
            what,
            f"layers {bad} are not attention layers of this model (it has {sorted(mods)})",
            f"attach {what} made for this model's analysed layers",
        )
    for i, item in items.items():
        setattr(mods[i], attr, item)
    return sorted(items)


def attach(model, maps: dict[int, PartialMap]) -> list[int]:
    """Set the map of each layer in ``maps`` (replacing any); other layers are left exact."""
    return _set_per_layer(model, maps, ATTR, "partial maps")


def detach(model) -> None:
    """Remove every map, peer, plan and probe: the model runs exact attention again."""
    for mod in attention_modules(model).values():
        for attr in (ATTR, PEER_ATTR, PLAN_ATTR, PROBE_ATTR):
            if hasattr(mod, attr):
                delattr(mod, attr)


def attach_peers(model, specs: dict[int, PeerSpec]) -> list[int]:
    """Run the view of each layer in ``specs`` with its peer (it takes precedence over a map)."""
    return _set_per_layer(model, specs, PEER_ATTR, "peers")


def detach_all(model) -> None:
    """Remove partial maps, Linformer projections and uniform attention."""
    detach(model)
    for mod in attention_modules(model).values():
        for attr in (LINFORMER_ATTR, UNIFORM_ATTR):
            if hasattr(mod, attr):
                delattr(mod, attr)


def maps_from_stats(
    stats,
    estimator: str,
    strategy: str,
    s: int,
    *,
    ridge: float,
    rank: float,
    seed: int,
    layers=None,
    trainable: bool = False,
) -> dict[int, PartialMap]:
    """One PartialMap per analysed layer from a :class:`eigenattn.spectra.stores.RowStats`."""
    return {
        layer: fit_map(stats, layer, estimator, strategy, s, ridge=ridge, rank=rank, seed=seed, trainable=trainable)
        for layer in (stats.layers if layers is None else layers)
    }


def fit_map(
    stats,
    layer: int,
    estimator: str,
    strategy: str,
    s: int,
    *,
    ridge: float,
    rank: float,
    seed: int,
    heads=None,
    trainable: bool = False,
) -> PartialMap:
    """The PartialMap of one layer's ``heads`` (all when None) from the view's fit statistics: a
    subset of heads gets the same (seeded) fits as in the whole layer's map."""
    mean, U, lam = stats.head_stats(layer)
    if heads is not None:
        heads = np.asarray(heads, dtype=int)
        mean, U, lam = mean[heads], U[heads], lam[heads]
    m = fit_heads(estimator, strategy, s, mean, U, lam, ridge=ridge, rank=rank, seed=seed, key=(layer,), heads=heads)
    return PartialMap(
        m.T,
        m.W,
        m.b,
        seq_len=stats.seq_len,
        query_range=stats.query_range,
        key_range=stats.key_range,
        causal=stats.causal,
        trainable=trainable,
    )
