"""Capture pre-softmax attention scores through ``transformers.AttentionInterface``.

The registered attention function computes the logits that enter the model's softmax before
masking, from what the model hands to its attention backend:

    S = scale · Q Kᵀ, then ``tanh(S / c) · c`` if the model passes ``softcap=c``, then
    ``+ position_bias`` if it passes one (T5's relative bias, ALiBi where it reaches the interface).

Q and K are taken after any positional transform (RoPE), so this works for absolute-position
encoders and rotary decoders alike, and with grouped-query attention every query head gets its own
matrix against its shared key head. Per-head attention sinks (``s_aux``, gpt-oss) are not token
pairs; they are recorded beside the scores. The function then finishes the attention: plain
attention (no softcap, bias, sink or dropout) through SDPA, with SDPA's own causal masking where the
layer's mask is the plain causal one; modified attention as eager attention does (mask, softmax
with the sink column, V). The model's outputs are those of its own attention, within the
equivalence probe's tolerance.

Every keyword argument the model passes is either applied (``scaling``, ``softcap``,
``position_bias``, ``s_aux``), carried by the mask the layer receives (``sliding_window``,
``is_causal``: recorded and checked by :mod:`eigenattn.capture.probe`), known to be bookkeeping that does
not change a full-sequence forward pass (:data:`IGNORED_KWARGS`), or None. Anything else raises
:class:`~eigenattn.errors.UnsupportedModelError` naming the argument: the backend never silently
drops a modifier it does not understand.

A mask function is registered under the same name: without it ``transformers`` would build a mask
for an unknown implementation and get it wrong. We reuse the eager mask (0 / dtype-min, additive).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import eager_mask

from eigenattn.capture.attention import (
    block_scores,
    expand_heads,
    finish_attention,
    mask_is_plain,
    quadrants,
    scaled_scores,
    sdpa_attention,
)
from eigenattn.errors import UnsupportedModelError

CAPTURE_IMPL = "eigenattn_capture"

_state = threading.local()


class StopForward(Exception):
    """Raised by the capture backend at the first attention call after ``ScoreCapture.stop_after``:
    a pass that needs only the first layers ends there (the caller catches it)."""


class ScoreCapture:
    """Collects per-layer scores of one forward pass.

    ``layers``: the layer indices to keep (None = all). ``store_dtype``: scores are cast to it
    on the device right after they are computed, which halves the copy for float16. ``out``: an
    optional (batch, len(layers), heads, n, n) tensor of ``store_dtype``; kept layer ``layers[i]``
    is then cast straight into ``out[:, i]`` (one pass, no intermediate copy) and ``scores`` holds
    views of it.

    Besides the scores it records, for every layer that ran (kept or not), the mask the layer
    received (``masks``), its sink logits (``sinks``, only where the model passes them), which
    modifiers were applied (``modifiers``) and its head shapes (``shapes``). A layer is keyed by
    its module's ``layer_idx`` (by call order for modules without one, such as ALBERT's shared
    layer); a second attention call under a key already taken in this forward pass raises rather
    than overwrite its scores (encoder–decoder self- and cross-attention share one ``layer_idx``).
    """

    def __init__(self, layers=None, store_dtype=torch.float32, out: torch.Tensor | None = None):
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.store_dtype = store_dtype
        if out is not None and layers is None:
            raise ValueError("an output buffer needs the list of layers it holds")
        self.out = out
        self.slot = {} if layers is None else {int(x): i for i, x in enumerate(layers)}
        self.scores: dict[int, torch.Tensor] = {}
        self.masks: dict[int, torch.Tensor | None] = {}
        self.sinks: dict[int, torch.Tensor] = {}
        self.modifiers: dict[int, dict] = {}
        self.shapes: dict[int, dict] = {}
        self.owners: dict[int, torch.nn.Module] = {}
        self.mask: torch.Tensor | None = None
        self.calls = 0
        # the last layer this pass needs: a later attention call raises StopForward
        self.stop_after: int | None = None
        self._causal: dict[int, tuple] = {}  # id(mask) -> (mask, is it the plain causal mask)

    def score_blocks(self, layer_idx: int, n: int, m: int) -> list[tuple[slice, slice]]:
        """The blocks of a kept layer's (n × m) scores this capture takes
        (:func:`eigenattn.capture.attention.quadrants`): all of them here; a capture that needs
        only a view's block (streamed moments) or none (a layer computed but not kept) takes fewer."""
        return quadrants(n, m)

    def causal_mask(self, mask: torch.Tensor | None) -> bool:
        """Whether ``mask`` (the additive or boolean mask a layer received) is the plain causal mask
        over square scores; checked once per mask tensor (the layers of a pass share one)."""
        if mask is None:
            return False
        hit = self._causal.get(id(mask))
        if hit is None or hit[0] is not mask:
            hit = (mask, mask_is_plain(mask, causal=True))
            self._causal[id(mask)] = hit
        return hit[1]

    def wants(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def store_part(self, layer_idx: int, b: int, batch: int, scores: torch.Tensor) -> None:
        """Store the scores of sequence ``b`` of a batch of ``batch`` (``scores``: heads, n, m)."""
        if b == 0:
            self.scores[layer_idx] = (
                scores.new_empty((batch, *scores.shape), dtype=self.store_dtype)
                if self.out is None
                else self.out[:, self.slot[layer_idx]]
            )
        self.scores[layer_idx][b].copy_(scores.detach())

    def store(self, layer_idx: int, scores: torch.Tensor) -> None:
        if self.out is None:
            self.scores[layer_idx] = scores.detach().to(self.store_dtype)
        else:
            dst = self.out[:, self.slot[layer_idx]]
            dst.copy_(scores.detach())
            self.scores[layer_idx] = dst

    def key(self, module) -> int:
        """The layer index of this call; raises if another call already used it in this pass."""
        layer_idx = getattr(module, "layer_idx", None)
        layer_idx = self.calls if layer_idx is None else int(layer_idx)
        self.calls += 1
        owner = self.owners.get(layer_idx)
        if owner is not None:
            same = "the same module" if owner is module else f"{type(owner).__name__} and {type(module).__name__}"
            raise UnsupportedModelError(
                f"two attention calls in one forward pass share layer index {layer_idx} ({same}); their "
                "scores would overwrite each other. Encoder–decoder models (self- and cross-attention per "
                "layer) and modules reused under one layer_idx cannot be stored as one score matrix per layer",
                "use an encoder-only or decoder-only model (for an encoder–decoder model, save its encoder "
                "alone, e.g. T5EncoderModel)",
                model_type=model_type_of(module),
            )
        self.owners[layer_idx] = module
        return layer_idx


# Keyword arguments that do not change the scores or probabilities of one unpadded forward pass
# over the whole sequence (no KV cache): output switches, cache bookkeeping, and positions that
# were already applied to Q and K (RoPE) or only steer fused kernels (flash attention's
# determinism flag). ``is_causal`` and ``sliding_window`` are honoured by the mask the layer
# receives, which eager attention applies; the probe checks that mask against ``sliding_window``.
IGNORED_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "position_embeddings",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_cache",
        "cache",
        "past_key_values",
        "past_key_value",
        "deterministic",
        "is_causal",
        "sliding_window",
    }
)
# Applied by the capture backend to the scores or the softmax.
APPLIED_KWARGS = frozenset({"softcap", "position_bias", "s_aux"})


def model_type_of(module) -> str | None:
    cfg = getattr(module, "config", None)
    return getattr(cfg, "model_type", None) or type(module).__name__


def check_kwargs(module, kwargs: dict, understood, backend: str) -> None:
    """Raise for any keyword argument that is not None and not ``understood`` by ``backend``."""
    bad = sorted(k for k, v in kwargs.items() if v is not None and k not in understood)
    if bad:
        shown = ", ".join(f"{k}={type(kwargs[k]).__name__}" for k in bad)
        raise UnsupportedModelError(
            f"its attention module {type(module).__name__} passes {shown} to the attention function, which "
            f"the '{backend}' backend does not implement; ignoring it would give scores that are not the "
            "model's",
            "use a model whose attention takes only the arguments listed in docs/models.md "
            "(Keyword arguments), or add this argument to the "
            "backend (eigenattn/capture.py) with a test against eager output_attentions",
            model_type=model_type_of(module),
        )


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention backend: eager attention that also records the pre-mask scores."""
    check_kwargs(module, kwargs, IGNORED_KWARGS | APPLIED_KWARGS, CAPTURE_IMPL)
    if query.shape[-1] != value.shape[-1]:
        raise UnsupportedModelError(
            f"multi-latent attention: the Q·K head size ({query.shape[-1]}) differs from the V head size "
            f"({value.shape[-1]}), so heads are not standard scaled dot products of one head dimension",
            "use a model with standard multi-head or grouped-query attention",
            model_type=model_type_of(module),
        )
    if query.shape[1] % key.shape[1]:
        raise UnsupportedModelError(
            f"{query.shape[1]} query heads cannot share {key.shape[1]} key heads evenly",
            "use a model with standard multi-head or grouped-query attention",
            model_type=model_type_of(module),
        )
    softcap = kwargs.get("softcap")
    bias = kwargs.get("position_bias")
    sinks = kwargs.get("s_aux")
    if softcap is not None and bias is not None:
        raise UnsupportedModelError(
            "it passes both a logit softcap and a position bias; their order is not defined by the attention interface",
            "use a model with at most one of them",
            model_type=model_type_of(module),
        )
    kv_heads = int(key.shape[1])
    key, value, scaling = expand_heads(query, key, value, scaling)
    cap: ScoreCapture | None = getattr(_state, "capture", None)
    layer_idx = None if cap is None else cap.key(module)
    if cap is not None and cap.stop_after is not None and layer_idx > cap.stop_after:
        raise StopForward(layer_idx)
    wanted = cap is not None and cap.wants(layer_idx)
    # Plain attention (no softcap, bias or sink, no dropout) never materialises the whole batch's
    # n×n matrices, and takes its output from SDPA (with SDPA's own causal masking where the mask
    # is the plain causal one), whether the layer is kept or not: a kept layer on CPU computes its
    # scores one sequence at a time in a reused buffer, only the blocks the capture takes
    # (:meth:`ScoreCapture.score_blocks`: a streamed view's block, or none for a layer computed but
    # not analysed); on GPU a kept layer computes its scores whole. Every route (score store,
    # streamed moments, recomputed scores) so runs the same arithmetic, and the layers above see
    # the same bits. The equivalence probe checks each against eager attention (last hidden state
    # included).
    plain = softcap is None and bias is None and sinks is None and not (module.training and dropout > 0)
    streamed = (
        wanted
        and plain
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and (attention_mask is None or attention_mask.is_floating_point())
    )
    scores = None
    if (wanted or not plain) and not streamed:
        scores = scaled_scores(query, key, scaling)
        if softcap is not None:  # as Gemma 2's eager attention: tanh(S / c) · c
            scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores + bias

    if cap is not None:
        if wanted and not streamed:
            cap.store(layer_idx, scores)
        cap.masks[layer_idx] = None if attention_mask is None else attention_mask.detach()
        if sinks is not None:
            cap.sinks[layer_idx] = sinks.detach().float().reshape(-1)
        cap.modifiers[layer_idx] = {
            "softcap": None if softcap is None else float(softcap),
            "position_bias": bias is not None,
            "sinks": sinks is not None,
            "sliding_window": kwargs.get("sliding_window"),
        }
        cap.shapes[layer_idx] = {
            "heads": int(query.shape[1]),
            "kv_heads": kv_heads,
            "head_dim": int(query.shape[-1]),
            "queries": int(query.shape[-2]),
            "keys": int(key.shape[-2]),
        }
        if cap.mask is None and attention_mask is not None:
            cap.mask = attention_mask.detach()

    causal = plain and cap is not None and cap.causal_mask(attention_mask)
    if streamed:
        blocks = cap.score_blocks(layer_idx, int(query.shape[-2]), int(key.shape[-2]))
        if blocks:

            def store(b, S):
                cap.store_part(layer_idx, b, query.shape[0], S)

            block_scores(query, key, scaling, store, blocks)
        else:  # no score of this layer is taken: it only runs
            for b in range(query.shape[0]):
                cap.store_part(layer_idx, b, query.shape[0], query.new_empty(0))
    if plain:
        return sdpa_attention(query, key, value, attention_mask, scaling, causal), None
    return finish_attention(module, scores, attention_mask, value, query.dtype, dropout, sinks=sinks)


_registered: set[str] = set()


def register_backend(name: str, fn) -> str:
    """Register an attention function and the eager mask under ``name`` (idempotent)."""
    if name not in _registered:
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
