"""Capture pre-softmax attention scores through ``transformers.AttentionInterface``.

The registered attention function computes ``S = scale * Q K^T`` from the query and key states
the model hands to its attention backend. Those are taken after any positional transform (RoPE),
so this works for absolute-position encoders and rotary decoders alike, and with grouped-query
attention every query head gets its own matrix against its shared key head. It then finishes the
attention eagerly (mask, softmax, V), so the model's outputs are unchanged.

A mask function is registered under the same name: without it ``transformers`` would build a mask
for an unknown implementation and get it wrong. We reuse the eager mask (0 / dtype-min, additive).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch.nn import functional as F

CAPTURE_IMPL = "eigenattn_capture"

_state = threading.local()


class ScoreCapture:
    """Collects per-layer scores of one forward pass.

    ``layers``: the layer indices to keep (None = all). ``store_dtype``: scores are cast to it
    on the device right after they are computed, which halves the copy for float16.
    """

    def __init__(self, layers=None, store_dtype=torch.float32):
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.store_dtype = store_dtype
        self.scores: dict[int, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.calls = 0

    def wants(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # Same head order as transformers' repeat_kv: kv head j serves query heads j*n_rep..(j+1)*n_rep-1.
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def expand_heads(query, key, value, scaling):
    """The default scale, and keys/values repeated to one per query head (grouped-query attention)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    return repeat_kv(key, n_rep), repeat_kv(value, n_rep), scaling


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention backend: eager attention that also records the pre-mask scores."""
    key, value, scaling = expand_heads(query, key, value, scaling)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling

    cap: ScoreCapture | None = getattr(_state, "capture", None)
    if cap is not None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            layer_idx = cap.calls
        cap.calls += 1
        if cap.wants(layer_idx):
            cap.scores[int(layer_idx)] = scores.detach().to(cap.store_dtype)
        if cap.mask is None and attention_mask is not None:
            cap.mask = attention_mask.detach()

    return finish_attention(module, scores, attention_mask, value, query.dtype, dropout)


def finish_attention(module, scores, mask, value, dtype, dropout=0.0):
    """Eager attention after the scores: additive mask, float32 softmax, dropout, P·V."""
    weights = scores if mask is None else scores + mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


_registered: set[str] = set()


def register_backend(name: str, fn) -> str:
    """Register an attention function and the eager mask under ``name`` (idempotent)."""
    if name not in _registered:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import eager_mask

        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, eager_mask)
        _registered.add(name)
    return name


def register() -> str:
    """Register the capture attention and mask functions (idempotent); return the impl name."""
    return register_backend(CAPTURE_IMPL, capture_attention_forward)


@contextmanager
def capturing(capture: ScoreCapture):
    """Within the block, forward passes of models using CAPTURE_IMPL record into ``capture``."""
    prev = getattr(_state, "capture", None)
    _state.capture = capture
    try:
        yield capture
    finally:
        _state.capture = prev


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True if an additive mask blocks every key after the query (a causal mask)."""
    if mask is None:
        return False
    m = mask[0, 0]
    n = min(m.shape[-2], m.shape[-1])
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=m.device), diagonal=1)
    return bool((m[:n, :n][upper] < -1e4).all()) and bool((m[:n, :n][~upper] == 0).all())
