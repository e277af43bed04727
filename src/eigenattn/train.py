"""Training with approximate attention (docs/method.md §8).

A small BERT-style encoder (``transformers.BertModel``, attention through the ``partial``
backend) trained with masked-language modelling on the fit split, evaluated on held-out text.
Logits are computed only at the masked positions. Variants differ only in attention:

- ``exact``: every score computed;
- ``partial_fixed``: scores at ``T`` only, ``â = W a_T + b`` with ``T, W, b`` fitted on the eigen
  analysis of the trained ``exact`` model, frozen;
- ``partial_learned``: the same, with ``W`` and ``b`` trained (initialised as in ``partial_fixed``);
- ``subset_only``: attention restricted to ``T`` (sparse attention, the control);
- ``linformer``: keys and values projected along the sequence to ``s`` rows by learned ``E, F``.

Every run of a seed sees the same data order, masks, dropout draws, step budget and optimiser:
all randomness is derived from ``(seed, step)``, which also makes resuming from a checkpoint
exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

VARIANTS = ("exact", "partial_fixed", "partial_learned", "subset_only", "linformer")
MODES = ("scratch", "finetune")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
METRIC_COLUMNS = ["step", "train_loss", "heldout_loss", "heldout_mlm_acc", "lr", "step_time_ms"]


# ------------------------------------------------------------------------------------- tokenizer


def train_wordpiece(texts, vocab_size: int, out_dir, seq_len: int):
    """Train a lower-cased WordPiece vocabulary on ``texts`` and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                        show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=seq_len)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.mask_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise InputError(f"{path}: the tokenizer needs [CLS], [SEP] and [MASK] tokens for MLM training")
    return tok


# ------------------------------------------------------------------------------------------ data


def split_texts(documents_path, seed: int, heldout_fraction: float) -> dict[str, list[str]]:
    """The fit and held-out documents, by the same split as the sampled passages."""
    import pandas as pd

    from .corpus import split_documents

    docs = pd.read_parquet(documents_path)
    split = split_documents(docs["n_words"].to_numpy(), seed, heldout_fraction)
    return {s: docs["text"][split == s].tolist() for s in ("fit", "heldout")}


def chunk_documents(tok, texts, seq_len: int) -> np.ndarray:
    """Every document's tokens cut into consecutive windows of seq_len − 2, framed by [CLS] … [SEP]."""
    body = seq_len - 2
    out = []
    limit, tok.model_max_length = tok.model_max_length, int(1e12)  # whole documents, cut below
    try:
        enc = tok(list(texts), add_special_tokens=False)["input_ids"]
    finally:
        tok.model_max_length = limit
    for ids in enc:
        for i in range(0, len(ids) - body + 1, body):
            out.append([tok.cls_token_id, *ids[i:i + body], tok.sep_token_id])
    if not out:
        raise InputError(f"no document is longer than seq_len − 2 = {body} tokens")
    return np.asarray(out, dtype=np.int64)


def build_windows(tokenizer_dir, documents, seq_len: int, seed: int, heldout_fraction: float, eval_sequences: int,
                  out_path) -> dict:
    """Tokenise the corpus once for every run: fit windows, and the evenly spread held-out windows.

    Writes an .npz with int32 arrays ``fit`` (N, n) and ``heldout`` (M, n), atomically.
    """
    tok = load_tokenizer(tokenizer_dir)
    texts = split_texts(documents, seed, heldout_fraction)
    fit = chunk_documents(tok, texts["fit"], seq_len)
    held = chunk_documents(tok, texts["heldout"], seq_len)
    pick = np.unique(np.linspace(0, len(held) - 1, min(eval_sequences, len(held))).round().astype(int))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial.npz")
    np.savez(tmp, fit=fit.astype(np.int32), heldout=held[pick].astype(np.int32))
    os.replace(tmp, out_path)
    return {"fit": len(fit), "heldout": len(pick), "heldout_available": len(held)}


def mask_batch(ids: torch.Tensor, tok_info: dict, generator: torch.Generator, p: float = 0.15):
    """BERT masking: p of the non-special tokens; of those 80% [MASK], 10% random, 10% kept.

    Returns (masked input, flat positions of the predicted tokens, their labels).
    """
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in tok_info["special_ids"]:
        special |= ids == t
    u = torch.rand(ids.shape, generator=generator)
    pick = (u < p) & ~special
    if not bool(pick.any()):  # at least one prediction per batch
        cand = (~special).flatten().nonzero().flatten()
        pick.view(-1)[cand[torch.randint(len(cand), (1,), generator=generator)]] = True
    r = torch.rand(ids.shape, generator=generator)
    rand_tok = torch.randint(0, tok_info["vocab_size"], ids.shape, generator=generator)
    rand_special = torch.isin(rand_tok, torch.tensor(tok_info["special_ids"]))
    x = ids.clone()
    x[pick & (r < 0.8)] = tok_info["mask_id"]
    swap = pick & (r >= 0.8) & (r < 0.9) & ~rand_special  # a random non-special token (else kept)
    x[swap] = rand_tok[swap]
    pos = pick.flatten().nonzero().flatten()
    return x, pos, ids.flatten()[pos]


# ----------------------------------------------------------------------------------------- model


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


class MLM(nn.Module):
    """BertModel + an MLM head evaluated only at the masked positions (decoder tied to embeddings)."""

    def __init__(self, config):
        super().__init__()
        from transformers import BertModel

        from .partial import register

        config._attn_implementation = register()
        self.encoder = BertModel(config, add_pooling_layer=False)
        h = config.hidden_size
        self.transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.layer_norm_eps))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, input_ids, positions, labels=None):
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        hm = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        logits = self.transform(hm) @ self.encoder.embeddings.word_embeddings.weight.T + self.bias
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels), logits


def bert_config(tcfg: dict, vocab_size: int, seq_len: int):
    from transformers import BertConfig

    m = tcfg["model"]
    return BertConfig(vocab_size=vocab_size, hidden_size=m["d_model"], num_hidden_layers=m["layers"],
                      num_attention_heads=m["heads"], intermediate_size=m["d_ff"], max_position_embeddings=seq_len,
                      hidden_dropout_prob=m["dropout"], attention_probs_dropout_prob=m["dropout"])


def attach_variant(model: MLM, variant: str, s: int, seq_len: int, stats=None, estimator="conditional_gaussian",
                   strategy="pivoted_qr", ridge=1e-6, seed=0, rank=0.5) -> None:
    """Give every attention layer of the encoder the variant's attention."""
    from .partial import LINFORMER_ATTR, attach, attention_modules, maps_from_stats

    mods = attention_modules(model.encoder)
    if variant == "exact":
        return
    if variant == "linformer":
        for i, mod in mods.items():
            setattr(mod, LINFORMER_ATTR, Linformer(seq_len, s))
        return
    if stats is None:
        raise InputError(f"variant '{variant}' needs the eigen statistics of the trained exact model")
    if stats.seq_len != seq_len or stats.view != "all":
        raise InputError(f"{stats.path}: statistics of view '{stats.view}' at seq_len {stats.seq_len}; training needs "
                         f"the 'all' view at seq_len {seq_len}")
    if sorted(stats.layers) != sorted(mods):
        raise InputError(f"{stats.path}: analysed layers {stats.layers} differ from the encoder's {sorted(mods)}")
    est = "subset_only" if variant == "subset_only" else estimator
    maps = maps_from_stats(stats, est, strategy, s, ridge=ridge, rank=rank, seed=seed,
                           trainable=variant == "partial_learned")
    attach(model.encoder, maps)


def attention_flops_per_seq(variant: str, n: int, s: int, layers: int, heads: int, d_head: int) -> int:
    """Multiply-adds of scores and P·V per sequence, summed over layers (as the method defines them)."""
    if variant == "exact":
        per = 2 * n * n * d_head
    elif variant == "partial_fixed" or variant == "partial_learned":
        per = n * s * d_head + n * s * n + n * n * d_head
    elif variant == "subset_only":
        per = 2 * n * s * d_head
    else:  # linformer: E K, F V, Q K'ᵀ, P V'
        per = 4 * n * s * d_head
    return int(per * heads * layers)


# -------------------------------------------------------------------------------------- training


def _lr(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay from peak to 10% of peak."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return peak * (step + 1) / w
    frac = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def shuffle_windows(ids: torch.Tensor, special_ids, seed: int) -> torch.Tensor:
    """The held-out windows with the order of their non-special tokens shuffled (seeded).

    A model scores as well on them as on the originals only if it ignores word order: then it is a
    bag-of-words predictor, and no attention variant can be told apart from exact attention.
    """
    g = torch.Generator().manual_seed(int(seed) * 104729 + 7)
    out = ids.clone()
    special = torch.isin(ids, torch.tensor(list(special_ids)))
    for i in range(len(ids)):
        pos = (~special[i]).nonzero().flatten()
        out[i, pos] = ids[i, pos[torch.randperm(len(pos), generator=g)]]
    return out


def heldout_batches(ids: torch.Tensor, tok_info: dict, seed: int, batch_size: int):
    """(masked input, positions, labels) of every held-out batch, with masks fixed by ``seed``.

    Every run, and the unigram baseline, is scored on exactly these tokens.
    """
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    for i in range(0, len(ids), batch_size):
        yield mask_batch(ids[i:i + batch_size], tok_info, g)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, tok_info: dict, seed: int, batch_size: int, device, amp) -> dict:
    """Held-out MLM loss (mean and per-token standard deviation), accuracy and token count."""
    model.eval()
    losses, correct = [], 0
    for x, pos, labels in heldout_batches(ids, tok_info, seed, batch_size):
        with amp():
            logits = model(x.to(device), pos.to(device))
        losses.append(F.cross_entropy(logits.float(), labels.to(device), reduction="none").cpu())
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    model.train()
    loss = torch.cat(losses).double()
    return {"loss": float(loss.mean()), "loss_sd": float(loss.std()), "acc": correct / len(loss), "tokens": len(loss)}


def unigram_baseline(fit_ids: torch.Tensor, heldout_ids: torch.Tensor, tok_info: dict, seed: int,
                     batch_size: int) -> dict:
    """What predicting without context achieves: the fit split's unigram entropy (nats, over
    non-special tokens), its most frequent token, and that token's accuracy on the held-out
    positions every run is scored on."""
    counts = torch.bincount(fit_ids.flatten(), minlength=tok_info["vocab_size"]).double()
    counts[torch.tensor(tok_info["special_ids"])] = 0
    p = counts / counts.sum()
    nz = p[p > 0]
    top = int(counts.argmax())
    hits, total = 0, 0
    for _, _, labels in heldout_batches(heldout_ids, tok_info, seed, batch_size):
        hits += int((labels == top).sum())
        total += len(labels)
    return {"unigram_entropy": float(-(nz * nz.log()).sum()), "unigram_top_token": top,
            "unigram_acc": hits / total, "heldout_tokens": total}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run(out_dir, *, mode: str, variant: str, s: int, seed: int, tcfg: dict, seq_len: int, tokenizer_dir,
        windows, data_seed: int, stats=None, init_dir=None, device="cpu",
        progress: bool = True) -> dict:
    """One training run into ``out_dir``: metrics.csv, final.json, model/ (and checkpoint.pt while running).

    ``windows``: the .npz of :func:`build_windows`; ``data_seed`` fixes the held-out masks.
    """
    import pandas as pd
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if variant not in VARIANTS:
        raise ConfigError("training.variants", f"unknown variant '{variant}'", f"use one of {', '.join(VARIANTS)}")
    if mode not in MODES:
        raise ConfigError("training.modes", f"unknown mode '{mode}'", f"use one of {', '.join(MODES)}")
    if variant != "exact" and not 1 <= s <= seq_len:
        raise ConfigError("training.subset_sizes", f"s={s} is outside 1..{seq_len}", f"use 1 <= s <= {seq_len}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    cuda = device.type == "cuda"

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    tok = load_tokenizer(tokenizer_dir)
    tok_info = {"special_ids": sorted(set(tok.all_special_ids)), "vocab_size": len(tok), "mask_id": tok.mask_token_id}
    with np.load(windows) as w:
        train_ids = torch.from_numpy(w["fit"].astype(np.int64))
        held_ids = torch.from_numpy(w["heldout"].astype(np.int64))
    if train_ids.shape[1] != seq_len:
        raise InputError(f"{windows}: windows of {train_ids.shape[1]} tokens, expected seq_len {seq_len}; "
                         "re-run train_data")
    log.info("%d training windows, %d held-out windows of %d tokens; vocabulary %d", len(train_ids), len(held_ids),
             seq_len, len(tok))

    cfg = bert_config(tcfg, len(tok), seq_len)
    torch.manual_seed(seed)
    model = MLM(cfg)
    if mode == "finetune":
        if init_dir is None:
            raise InputError("finetune mode needs the trained exact model (init_dir)")
        from safetensors.torch import load_file

        state = load_file(str(Path(init_dir) / "mlm.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"{init_dir}: checkpoint does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    attach_variant(model, variant, s, seq_len, stats, tcfg.get("estimator", "conditional_gaussian"),
                   tcfg.get("strategy", "pivoted_qr"), tcfg.get("ridge", 1e-6), seed,
                   rank=tcfg.get("eigenspace_rank", 0.5))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], betas=(0.9, 0.98))
    bs = tcfg["batch_size"]
    steps = tcfg["steps"] if mode == "scratch" else tcfg["finetune_steps"]
    peak = tcfg["lr"] if mode == "scratch" else tcfg["finetune_lr"]

    records, start = [], 0
    ckpt = out_dir / "checkpoint.pt"
    meta = {"mode": mode, "variant": variant, "s": s, "seed": seed, "steps": steps, "batch_size": bs,
            "seq_len": seq_len, "n_params": n_params, "tcfg": json.loads(json.dumps(tcfg, sort_keys=True))}
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("meta") == meta:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            records, start = state["records"], state["step"]
            log.info("resumed from checkpoint %s at step %d", ckpt, start)
        else:
            log.warning("ignoring checkpoint %s written for another configuration", ckpt)
    if start == 0 and mode == "finetune":
        ev = evaluate(model, held_ids, tok_info, data_seed, bs, device, amp)
        records.append({"step": 0, "train_loss": float("nan"), "heldout_loss": ev["loss"],
                        "heldout_mlm_acc": ev["acc"], "lr": 0.0, "step_time_ms": float("nan")})
        log.info("step 0 (before fine-tuning): heldout loss %.4f acc %.4f", ev["loss"], ev["acc"])

    n_train = len(train_ids)
    ev: dict = {}
    perms = {}

    def order(j):  # the j-th training example of this seed: a fresh permutation per epoch
        e = j // n_train
        if e not in perms:
            perms[e] = np.random.default_rng([seed, e]).permutation(n_train)
        return perms[e][j % n_train]

    window_loss, window_time, window_n = 0.0, 0.0, 0
    bar = tqdm(total=steps, initial=start, desc=f"{mode}/{variant}/s{s}/seed{seed}", disable=not progress,
               mininterval=5.0)
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = [order(j) for j in range(step * bs, (step + 1) * bs)]
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x, pos, labels = mask_batch(train_ids[idx], tok_info, g)
        torch.manual_seed(seed * 1_000_003 + step)  # dropout draws
        lr = _lr(step, steps, peak, tcfg["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        with amp():
            loss, _ = model(x.to(device), pos.to(device), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        loss_value = float(loss.detach())
        window_loss += loss_value
        window_time += time.perf_counter() - t0
        window_n += 1
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if done % tcfg["log_every"] == 0 or done == steps:
            rec = {"step": done, "train_loss": window_loss / window_n, "heldout_loss": float("nan"),
                   "heldout_mlm_acc": float("nan"), "lr": lr, "step_time_ms": 1000 * window_time / window_n}
            if done % tcfg["eval_every"] == 0 or done == steps:
                ev = evaluate(model, held_ids, tok_info, data_seed, bs, device, amp)
                rec["heldout_loss"], rec["heldout_mlm_acc"] = ev["loss"], ev["acc"]
                log.info("step %d: train loss %.4f, heldout loss %.4f, acc %.4f, %.1f ms/step", done,
                         rec["train_loss"], rec["heldout_loss"], rec["heldout_mlm_acc"], rec["step_time_ms"])
            records.append(rec)
            window_loss, window_time, window_n = 0.0, 0.0, 0
            if done % tcfg["checkpoint_every"] == 0 and done < steps:
                _atomic_save({"meta": meta, "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "records": records, "step": done}, ckpt)
    bar.close()

    metrics = pd.DataFrame.from_records(records, columns=METRIC_COLUMNS)
    for i, (key, value) in enumerate({"mode": mode, "variant": variant, "subset_size": s, "seed": seed}.items()):
        metrics.insert(i, key, value)  # each file names its own run
    last = metrics.dropna(subset=["heldout_mlm_acc"]).iloc[-1]
    timed = metrics[metrics.step > 0].step_time_ms.dropna()
    cfg_m = tcfg["model"]
    shuffled = evaluate(model, shuffle_windows(held_ids, tok_info["special_ids"], data_seed), tok_info, data_seed, bs,
                        device, amp)
    final = {"mode": mode, "variant": variant, "subset_size": s, "seed": seed, "steps": steps,
             "heldout_mlm_acc": float(last.heldout_mlm_acc), "heldout_loss": float(last.heldout_loss),
             "heldout_loss_sd": ev["loss_sd"], "heldout_mlm_acc_shuffled": shuffled["acc"],
             **unigram_baseline(train_ids, held_ids, tok_info, data_seed, bs),
             "params": n_params, "trainable_params": sum(p.numel() for p in params),
             "attention_flops_per_seq": attention_flops_per_seq(variant, seq_len, s, cfg_m["layers"], cfg_m["heads"],
                                                                cfg_m["d_model"] // cfg_m["heads"]),
             "mean_step_time_ms": float(timed.mean()) if len(timed) else float("nan"),
             "device": str(device), "seq_len": seq_len, "vocab_size": len(tok)}
    if mode == "finetune":
        final["heldout_mlm_acc_step0"] = float(metrics.iloc[0].heldout_mlm_acc)
    # publish: model/ (HF encoder + tokenizer + the full MLM state), metrics.csv, final.json
    from .partial import detach_all

    mdir = out_dir / "model"
    tmp = out_dir / ".model.partial"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "mlm.safetensors"))
    detach_all(model.encoder)
    model.encoder.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if mdir.exists():
        import shutil

        shutil.rmtree(mdir)
    os.replace(tmp, mdir)
    from .store import write_table

    write_table(metrics, out_dir / "metrics.csv")
    tmpj = out_dir / ".final.json.partial"
    tmpj.write_text(json.dumps(final, indent=2))
    os.replace(tmpj, out_dir / "final.json")
    if ckpt.exists():
        ckpt.unlink()
    log.info("final: %s", final)
    return final


SUMMARY_COLUMNS = ["mode", "variant", "subset_size", "seed", "steps", "heldout_mlm_acc", "heldout_loss",
                   "heldout_loss_sd", "heldout_tokens", "heldout_mlm_acc_step0", "params", "attention_flops_per_seq",
                   "flops_ratio", "mean_step_time_ms", "unigram_entropy", "unigram_acc", "exact_mean_acc",
                   "exact_seed_sd", "exact_acc_gap", "exact_acc_gap_low", "exact_loss_gap", "exact_loss_gap_low",
                   "exact_learned", "heldout_mlm_acc_shuffled", "exact_order_gain", "exact_order_gain_low",
                   "exact_uses_order", "delta_vs_exact", "delta_ci_low", "delta_ci_high", "kept_gain",
                   "kept_gain_ci_low", "kept_gain_ci_high"]


def summarise(final_paths) -> "pd.DataFrame":
    """summary.csv: one row per run, each compared with ``exact`` of its mode.

    - ``exact_learned``: exact's accuracy beats the unigram baseline's, and its loss the unigram
      entropy, by more than their 95% intervals (:func:`eigenattn.stats.learned_margins`); unless
      it does, no comparison with exact can speak to C4.
    - ``exact_uses_order``: exact scores better on the held-out windows than on the same windows with
      their tokens shuffled, beyond the 95% interval (:func:`eigenattn.stats.order_gain`); a model
      that ignores word order is a bag-of-words predictor, against which no attention variant can
      be told apart.
    - ``delta_vs_exact`` with its 95% interval (:func:`eigenattn.stats.accuracy_difference`).
    - ``kept_gain``: the share of exact's gain over the unigram baseline that the run keeps,
      ``(acc − unigram_acc) / (exact_mean_acc − unigram_acc)``, with the interval of the difference.
    """
    import pandas as pd

    from .stats import accuracy_difference, learned_margins, order_gain

    df = pd.DataFrame([json.loads(Path(p).read_text()) for p in final_paths])
    if "heldout_mlm_acc_step0" not in df:
        df["heldout_mlm_acc_step0"] = np.nan
    for key in ("unigram_entropy", "unigram_acc", "heldout_tokens"):
        if df[key].nunique() != 1:
            raise InputError(f"training runs were scored on different held-out data ({key} differs: "
                             f"{sorted(df[key].unique())}); re-run the training stage")
    n_tokens = int(df.heldout_tokens.iloc[0])
    u = float(df.unigram_acc.iloc[0])
    for col in SUMMARY_COLUMNS:
        if col not in df:
            df[col] = np.nan
    df["exact_learned"] = False
    df["exact_uses_order"] = False
    for mode, g in df.groupby("mode"):
        ex = g[g.variant == "exact"]
        if len(ex) < 2:
            raise InputError(f"mode '{mode}': {len(ex)} exact run(s); seed noise needs at least two exact seeds")
        m = learned_margins(ex.heldout_mlm_acc, ex.heldout_loss, ex.heldout_loss_sd, n_tokens, u,
                            float(ex.unigram_entropy.iloc[0]))
        gain = m["acc_gap"]
        df.loc[g.index, ["exact_mean_acc", "exact_seed_sd"]] = [ex.heldout_mlm_acc.mean(), ex.heldout_mlm_acc.std()]
        df.loc[g.index, ["exact_acc_gap", "exact_acc_gap_low", "exact_loss_gap", "exact_loss_gap_low"]] = [
            m["acc_gap"], m["acc_gap_low"], m["loss_gap"], m["loss_gap_low"]]
        df.loc[g.index, "exact_learned"] = m["learned"]
        o = order_gain(ex.heldout_mlm_acc, ex.heldout_mlm_acc_shuffled, n_tokens)
        df.loc[g.index, ["exact_order_gain", "exact_order_gain_low"]] = [o["gain"], o["gain_low"]]
        df.loc[g.index, "exact_uses_order"] = o["uses_order"]
        df.loc[g.index, "flops_ratio"] = g.attention_flops_per_seq / ex.attention_flops_per_seq.iloc[0]
        for i, r in g.iterrows():
            delta, lo, hi = accuracy_difference([r.heldout_mlm_acc], ex.heldout_mlm_acc, n_tokens)
            df.loc[i, ["delta_vs_exact", "delta_ci_low", "delta_ci_high"]] = [delta, lo, hi]
            if gain > 0:
                df.loc[i, ["kept_gain", "kept_gain_ci_low", "kept_gain_ci_high"]] = [
                    (gain + delta) / gain, (gain + lo) / gain, (gain + hi) / gain]
    order = {v: i for i, v in enumerate(VARIANTS)}
    df = df.sort_values(["mode", "variant", "subset_size", "seed"], key=lambda c: c.map(order) if c.name == "variant"
                        else (c.map({"scratch": 0, "finetune": 1}) if c.name == "mode" else c))
    return df[SUMMARY_COLUMNS].reset_index(drop=True)
