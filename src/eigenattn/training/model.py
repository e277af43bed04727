"""The MLM encoder of the training stage (docs/method.md §8) and its attention variants.

A small encoder with the ``partial`` attention backend and an MLM head whose logits are computed
only at the masked positions. ``training.model.positions`` chooses the encoder:

- ``rotary`` (default): ``transformers.ModernBertModel`` with global attention in every layer, so
  RoPE rotates Q and K *inside* the attention module, before the attention backend. The capture
  backend, the partial maps and Linformer all see the rotated Q and K that training used, and the
  saved encoder loads anywhere with ``AutoModel``;
- ``absolute``: ``transformers.BertModel`` with learned absolute position embeddings.

Variants differ only in attention:

- ``exact``: every score computed;
- ``partial_fixed``: scores at ``T`` only, ``â = W a_T + b`` with ``T, W, b`` fitted on the eigen
  analysis of the trained ``exact`` model, frozen;
- ``partial_learned``: the same, with ``W`` and ``b`` trained (initialised as in ``partial_fixed``);
- ``subset_only``: attention restricted to ``T`` (sparse attention, the control);
- ``linformer``: keys and values projected along the sequence to ``s`` rows by learned ``E, F``;
- ``nystrom``: Nyströmformer's attention with ``s`` landmarks (segment means of Q and K), no
  parameters of its own (``training.nystrom_pinv`` chooses the pseudo-inverse);
- ``uniform``: every query attends equally to every key (no scores: the mean of the values). It is
  C4's floor, order-free context, and is always trained beside exact, with the same seeds.

Their cost is :func:`eigenattn.reconstruction.cost.attention_flops_per_seq`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, BertConfig, ModernBertConfig

from eigenattn.config.schema import enum
from eigenattn.config.settings import EncoderModel
from eigenattn.errors import InputError
from eigenattn.reconstruction.cost import attention_flops_per_seq
from eigenattn.reconstruction.estimators import check_method
from eigenattn.reconstruction.partial import (
    LINFORMER_ATTR,
    UNIFORM_ATTR,
    Linformer,
    attach,
    attach_peers,
    attention_modules,
    maps_from_stats,
    register,
)
from eigenattn.reconstruction.peer_attention import PeerSpec

__all__ = ["MLM", "MODES", "REFERENCES", "VARIANTS", "attach_variant", "attention_flops_per_seq", "encoder_config"]

REFERENCES = ("exact", "uniform")  # trained in every mode with every seed; s is seq_len
VARIANTS = (*REFERENCES, *enum("training.variants"))
MODES = enum("training.modes")


class MLM(nn.Module):
    """BertModel + an MLM head evaluated only at the masked positions (decoder tied to embeddings)."""

    def __init__(self, hf_config):
        super().__init__()
        hf_config._attn_implementation = register()
        kw = {"add_pooling_layer": False} if hf_config.model_type == "bert" else {}
        self.encoder = AutoModel.from_config(hf_config, attn_implementation=hf_config._attn_implementation, **kw)
        h = hf_config.hidden_size
        eps = getattr(hf_config, "layer_norm_eps", None) or hf_config.norm_eps  # BERT's name, else ModernBERT's
        self.transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=eps))
        self.bias = nn.Parameter(torch.zeros(hf_config.vocab_size))

    def forward(self, input_ids, positions, labels=None):
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        hm = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        logits = self.transform(hm) @ self.encoder.get_input_embeddings().weight.T + self.bias
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels), logits


def encoder_config(model: EncoderModel, vocab_size: int, seq_len: int):
    """The encoder's transformers config from ``training.model`` (``positions``: rotary or absolute)."""
    m = model
    common = {
        "vocab_size": vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "intermediate_size": m.d_ff,
        "max_position_embeddings": seq_len,
        "initializer_range": m.init_range,
    }
    if m.positions == "absolute":
        return BertConfig(**common, hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    # every layer global (no sliding window); pad/bos/eos/cls/sep ids are unused by the MLM
    return ModernBertConfig(
        **common,
        layer_types=["full_attention"] * m.layers,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        attention_dropout=m.dropout,
        mlp_dropout=m.dropout,
        embedding_dropout=m.dropout,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        cls_token_id=None,
        sep_token_id=None,
    )


def attach_variant(
    model: MLM,
    variant: str,
    s: int,
    seq_len: int,
    stats=None,
    *,
    estimator: str,
    strategy: str,
    ridge: float,
    rank: float,
    seed: int,
    pinv: str | None = None,
) -> None:
    """Give every attention layer of the encoder the variant's attention (``stats``: a RowStats of the
    trained exact model's ``all`` view, for the variants that fit T, W, b on it)."""
    mods = attention_modules(model.encoder)
    if variant == "exact":
        return
    if variant == "uniform":
        for mod in mods.values():
            setattr(mod, UNIFORM_ATTR, True)
        return
    if variant == "linformer":
        for mod in mods.values():
            setattr(mod, LINFORMER_ATTR, Linformer(seq_len, s))
        return
    if variant == "nystrom":
        kw = {"seq_len": seq_len, "query_range": (0, seq_len), "key_range": (0, seq_len), "causal": False}
        spec = PeerSpec("nystrom", s, **kw, q_last=1, sinks=0, pinv=pinv, key="training.subset_sizes")
        attach_peers(model.encoder, {layer: spec for layer in mods})
        return
    if stats is None:
        raise InputError(
            "stats",
            f"variant '{variant}' needs the eigen statistics of the trained exact model",
            "pass the trained exact model's rows.zarr (the eigen stage writes it)",
        )
    if stats.seq_len != seq_len or stats.view != "all":
        raise InputError(
            stats.path,
            f"statistics of view '{stats.view}' at seq_len {stats.seq_len}; training needs "
            f"the 'all' view at seq_len {seq_len}",
            "re-run the eigen stage on the trained exact model",
        )
    if sorted(stats.layers) != sorted(mods):
        raise InputError(
            stats.path,
            f"analysed layers {stats.layers} differ from the encoder's {sorted(mods)}",
            "re-run the eigen stage on the trained exact model, all layers",
        )
    est = "subset_only" if variant == "subset_only" else estimator
    check_method(est, strategy, s, stats.d, ("training.estimator", "training.strategy", "training.subset_sizes"))
    maps = maps_from_stats(
        stats, est, strategy, s, ridge=ridge, rank=rank, seed=seed, trainable=variant == "partial_learned"
    )
    attach(model.encoder, maps)
