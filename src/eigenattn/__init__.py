"""eigenattn: eigen analysis of transformer self-attention scores.

The numerics live here as plain functions of arrays; the Snakemake workflow under
``workflow/`` only wires files to them.
"""

__version__ = "0.1.0"

SCORE_DEFINITION = (
    "S = scale * Q K^T (+ any additive positional bias), before the attention mask and the "
    "softmax; Q and K after any positional transform (RoPE); with grouped-query attention "
    "every query head has its own matrix and shares its key head. P = softmax(S + mask)."
)
