"""eigenattn: eigen analysis of transformer self-attention scores.

The numerics live here as plain functions of arrays; the Snakemake workflow under
``workflow/`` only wires files to them.
"""

__version__ = "0.1.0"

SCORE_DEFINITION = (
    "S = scale * Q K^T, then tanh(S/c)*c where the model soft-caps its logits (softcap c), then + any "
    "additive bias the model adds (relative position bias, ALiBi): the logits that enter the softmax, "
    "before the attention mask; Q and K after any positional transform (RoPE); with grouped-query "
    "attention every query head has its own matrix and shares its key head. P = softmax(S + mask) per "
    "layer, with that layer's mask (attrs layer_masks) and, where the store has `sinks`, one extra sink "
    "column per head: P = softmax([S + mask, sink])[..., :n]."
)
