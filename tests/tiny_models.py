"""Tiny random-weight models of many transformer families, saved as local Hugging Face directories.

Each family is built from its config (2 layers, hidden size 32, 4 heads; windows and chunks of
4 tokens, shorter than the test sequences), with a character-level WordPiece tokenizer of 76
tokens saved beside it, so no hub access is needed. Query and key weights are scaled until the
attention scores are of order 10 (std ~3): with the default initialisation they are ~0.01, and
softcapping, sinks or biases would then be invisible in the probabilities.

``FAMILIES`` maps a name to (what it covers, builder, expected outcome): ``None`` when the
capture must pass the oracle, else a regex the refusal message must match.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import numpy as np
import torch
import zarr

VOCAB = 128
WINDOW = 4  # sliding windows and chunks, in tokens (the tests use longer sequences)
SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def tokenizer():
    """A character-level WordPiece tokenizer (lower-case letters and digits), as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *(f"##{c}" for c in chars)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def texts(k: int, words: int = 24, seed: int = 0) -> list[str]:
    """k passages of random lower-case words (character-level: each gives >= `words` tokens)."""
    rng = np.random.default_rng(seed)
    letters = list(string.ascii_lowercase)
    return [" ".join("".join(rng.choice(letters, size=rng.integers(2, 7))) for _ in range(words)) for _ in range(k)]


def _small(**extra):
    return dict(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **SPECIAL,
        **extra,
    )


def _configs():
    import transformers as T

    return {
        "bert": ("encoder, absolute positions", lambda: T.BertConfig(**_small())),
        "albert": (
            "encoder, one layer shared by all layers (no layer_idx)",
            lambda: T.AlbertConfig(**_small(embedding_size=16)),
        ),
        "distilbert": (
            "encoder",
            lambda: T.DistilBertConfig(dim=32, n_heads=4, n_layers=2, hidden_dim=64, vocab_size=VOCAB, pad_token_id=0),
        ),
        "modernbert": (
            "encoder, RoPE, bidirectional sliding-window (local) layers",
            lambda: T.ModernBertConfig(
                **_small(global_attn_every_n_layers=2, local_attention=2 * WINDOW, cls_token_id=2, sep_token_id=3)
            ),
        ),
        "t5_encoder": (
            "encoder, relative position bias (T5EncoderModel)",
            lambda: T.T5Config(
                d_model=32,
                d_kv=8,
                num_heads=4,
                d_ff=64,
                num_layers=2,
                vocab_size=VOCAB,
                pad_token_id=0,
                eos_token_id=3,
                decoder_start_token_id=0,
            ),
        ),
        "gpt2": (
            "causal, absolute positions",
            lambda: T.GPT2Config(
                n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=128, bos_token_id=2, eos_token_id=3
            ),
        ),
        "opt": (
            "causal, learned positions",
            lambda: T.OPTConfig(
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=2,
                ffn_dim=64,
                word_embed_proj_dim=32,
                vocab_size=VOCAB,
                max_position_embeddings=128,
                **SPECIAL,
            ),
        ),
        "llama": ("causal, RoPE", lambda: T.LlamaConfig(**_small(num_key_value_heads=4))),
        "qwen2": ("causal, RoPE, grouped-query attention", lambda: T.Qwen2Config(**_small(num_key_value_heads=2))),
        "qwen3": (
            "causal, RoPE, GQA, per-head q/k norms",
            lambda: T.Qwen3Config(**_small(num_key_value_heads=2, head_dim=8)),
        ),
        "gpt_neox": ("causal, partial RoPE, fused QKV", lambda: T.GPTNeoXConfig(**_small())),
        "mistral": (
            "causal, sliding window shorter than the sequence",
            lambda: T.MistralConfig(**_small(num_key_value_heads=2, sliding_window=WINDOW)),
        ),
        "gemma2": (
            "causal, logit softcapping, alternating sliding-window layers",
            lambda: T.Gemma2Config(
                **_small(num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=20.0)
            ),
        ),
        "gemma3": (
            "causal, q/k norms, alternating sliding-window layers",
            lambda: T.Gemma3TextConfig(
                **_small(
                    num_key_value_heads=2,
                    head_dim=8,
                    sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"],
                )
            ),
        ),
        "gpt_oss": (
            "causal, attention sinks (s_aux), sliding-window layers, MoE",
            lambda: T.GptOssConfig(
                **_small(
                    num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW
                )
            ),
        ),
        "llama4": (
            "causal, chunked attention layers and NoPE layers",
            lambda: T.Llama4TextConfig(
                **_small(
                    num_key_value_heads=2,
                    head_dim=8,
                    attention_chunk_size=WINDOW,
                    num_local_experts=2,
                    intermediate_size_mlp=64,
                    interleave_moe_layer_step=2,
                    no_rope_layers=[1, 0],
                    use_qk_norm=False,
                )
            ),
        ),
        # refused
        "bloom": (
            "ALiBi in its own attention code",
            lambda: T.BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=VOCAB, **SPECIAL),
        ),
        "mpt": (
            "ALiBi in its own attention code",
            lambda: T.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=128),
        ),
        "falcon": (
            "its own attention classes (no AttentionInterface)",
            lambda: T.FalconConfig(
                hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB, **SPECIAL
            ),
        ),
        "deberta_v2": ("disentangled attention in its own code", lambda: T.DebertaV2Config(**_small())),
        "t5": (
            "encoder-decoder (T5Model)",
            lambda: T.T5Config(
                d_model=32,
                d_kv=8,
                num_heads=4,
                d_ff=64,
                num_layers=2,
                vocab_size=VOCAB,
                pad_token_id=0,
                eos_token_id=3,
                decoder_start_token_id=0,
            ),
        ),
        "bart": (
            "encoder-decoder (BartModel)",
            lambda: T.BartConfig(
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                vocab_size=VOCAB,
                max_position_embeddings=128,
                **SPECIAL,
            ),
        ),
        "deepseek_v3": (
            "multi-latent attention (Q·K head size 16, V head size 8)",
            lambda: T.DeepseekV3Config(
                **_small(
                    num_key_value_heads=4,
                    kv_lora_rank=16,
                    q_lora_rank=16,
                    qk_rope_head_dim=8,
                    qk_nope_head_dim=8,
                    v_head_dim=8,
                    n_routed_experts=2,
                    num_experts_per_tok=1,
                    first_k_dense_replace=2,
                    n_group=1,
                    topk_group=1,
                    moe_intermediate_size=16,
                )
            ),
        ),
    }


NOT_ROUTED = r"no scores captured: its attention never reaches transformers' AttentionInterface"
EXPECTED = {
    "bloom": NOT_ROUTED,
    "mpt": NOT_ROUTED,
    "deberta_v2": NOT_ROUTED,
    "falcon": r"does not go through transformers' AttentionInterface",
    "t5": r"encoder–decoder model .*T5EncoderModel",
    "bart": r"encoder–decoder model",
    "deepseek_v3": r"multi-latent attention: the Q·K head size \(16\) differs from the V head size \(8\)",
}
FAMILIES = {name: (what, build, EXPECTED.get(name)) for name, (what, build) in _configs().items()}


def _model(name, config):
    import transformers as T

    if name == "t5_encoder":
        return T.T5EncoderModel(config)
    return T.AutoModel.from_config(config)


# Attention projections by their module name (Linear), and fused QKV projections.
_QK = {"q_proj", "k_proj", "query", "key", "q", "k", "q_lin", "k_lin"}


def _scale_qk(model, f: float) -> None:
    """Multiply every query and key projection (or per-head q/k norm, where present) by f."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            cls = type(mod).__name__
            if leaf in ("q_norm", "k_norm") and hasattr(mod, "weight"):
                if "Gemma" in cls:  # Gemma norms multiply by (1 + weight)
                    mod.weight.copy_((1 + mod.weight) * f - 1)
                else:
                    mod.weight.mul_(f)
            elif leaf in _QK and isinstance(mod, torch.nn.Linear) and not _has_qk_norm(model, name):
                mod.weight.mul_(f)
                if mod.bias is not None:
                    mod.bias.mul_(f)
            elif leaf == "c_attn":  # GPT-2 Conv1D: columns [q | k | v]
                e = mod.weight.shape[1] // 3
                mod.weight[:, : 2 * e].mul_(f)
                mod.bias[: 2 * e].mul_(f)
            elif leaf == "Wqkv":  # ModernBERT: rows [q | k | v]
                e = mod.weight.shape[0] // 3
                mod.weight[: 2 * e].mul_(f)
            elif leaf == "query_key_value" and cls == "Linear" and "neox" in type(model).__name__.lower():
                h = model.config.num_attention_heads  # GPT-NeoX: rows per head [q | k | v]
                w = mod.weight.view(h, 3, -1, mod.weight.shape[1])
                w[:, :2].mul_(f)
                if mod.bias is not None:
                    mod.bias.view(h, 3, -1)[:, :2].mul_(f)


def _has_qk_norm(model, linear_name: str) -> bool:
    parent = linear_name.rsplit(".", 1)[0]
    mod = model.get_submodule(parent) if parent != linear_name else model
    return hasattr(mod, "q_norm") and hasattr(mod, "k_norm")


def _score_std(model, ids) -> float:
    from eigenattn.capture.interface import ScoreCapture, capturing, register

    impl = model.config._attn_implementation
    model.set_attn_implementation(register())
    cap = ScoreCapture()
    try:
        with torch.no_grad(), capturing(cap):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.set_attn_implementation(impl)
    if not cap.scores:
        return float("nan")
    return float(np.mean([s.float().std().item() for s in cap.scores.values()]))


def build(name: str, dest: Path, target_std: float = 3.0) -> Path:
    """Save family ``name`` as a tiny model with its tokenizer in ``dest``; return ``dest``."""
    torch.manual_seed(0)
    config = _configs()[name][1]()
    model = _model(name, config).eval()
    ids = torch.randint(4, 76, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # calibrate: score std ~ target (scores of order 10)
        try:
            std = _score_std(model, ids)
        except Exception:  # families the capture refuses: scale by a fixed factor
            std = float("nan")
        f = math.sqrt(target_std / std) if std == std and std > 0 else 30.0
        _scale_qk(model, f)
        if not (std == std) or abs(std / target_std - 1) < 0.3:
            break
    dest = Path(dest)
    model.save_pretrained(dest)
    tokenizer().save_pretrained(dest)
    return dest


def build_wide_t5(dest: Path, target_std: float = 50.0, bias_scale: float = 200.0) -> Path:
    """A tiny T5 encoder whose float16 scores do not reproduce its probabilities.

    T5 does not scale its logits by 1/sqrt(d), and adds a relative position bias: here Q and K
    are scaled to a score std of ``target_std`` and the bias table multiplied by ``bias_scale``
    (std ~0.2 -> ~40), so |S| reaches ~250, where float16's ~3 significant digits move the
    probabilities by ~1e-2 while float32 stays at ~1e-7.
    """
    import transformers as T

    dest = build("t5_encoder", Path(dest), target_std=target_std)
    model = T.T5EncoderModel.from_pretrained(dest)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_attention_bias.weight"):
                p.mul_(bias_scale)
    model.save_pretrained(dest)
    return dest


# The oracle: the store's probabilities by the docs/models.md formula against the model's own eager attention.


def _visible(info: dict, n: int) -> np.ndarray:
    """docs/models.md: the keys each mask kind lets query i see."""
    i, j = np.indices((n, n))
    kind = info["kind"]
    return {
        "bidirectional": np.ones((n, n), bool),
        "causal": j <= i,
        "sliding_window": (j <= i) & (i - j < info.get("window", 0)),
        "chunked": (j <= i) & (i // info.get("chunk", 1) == j // info.get("chunk", 1)),
        "bidirectional_sliding_window": np.abs(i - j) <= info.get("window", 0),
    }[kind]


def store_probabilities(store) -> np.ndarray:
    """P (N, L, H, n, n) from a score store by the docs/models.md formula, in float64."""
    g = zarr.open_group(store, mode="r")
    a = g.attrs.asdict()
    S = g["scores"][:].astype(np.float64)
    n = S.shape[-1]
    vis = np.stack([_visible(m, n) for m in a["layer_masks"]])[None, :, None]  # (1, L, 1, n, n)
    logits = np.where(vis, S, -np.inf)
    if "sinks" in g:
        sink = g["sinks"][:].astype(np.float64)[None, :, :, None, None]  # (1, L, H, 1, 1)
        logits = np.concatenate([logits, np.broadcast_to(sink, S.shape[:-1] + (1,))], axis=-1)
    logits = logits - logits.max(-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(-1, keepdims=True))[..., :n]


def eager_attentions(model_dir, ids: np.ndarray, layers) -> np.ndarray:
    import transformers

    from eigenattn.capture.probe import model_class

    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    model = (
        model_class(cfg, "oracle").from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    )
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=torch.ones_like(x), output_attentions=True)
    return np.stack([out.attentions[l].numpy() for l in layers], axis=1)
