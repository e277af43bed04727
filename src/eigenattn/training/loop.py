"""One training run with approximate attention (docs/method.md §8): the loop, its held-out
evaluation, resumable checkpoints, and the published run folder.

Every run of a seed sees the same data order, masks, dropout draws, step budget and optimiser:
all randomness is derived from ``(seed, step)``, which also makes resuming from a checkpoint
exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm.auto import tqdm

from eigenattn import __version__
from eigenattn.config.settings import Training
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.partial import detach_all
from eigenattn.storage.assets import sha256_file
from eigenattn.storage.store import atomic_output, write_table
from eigenattn.training.data import heldout_batches, load_tokenizer, mask_batch, shuffle_windows, unigram_baseline
from eigenattn.training.model import MLM, MODES, VARIANTS, attach_variant, attention_flops_per_seq, encoder_config
from eigenattn.training.summary import TOKENS_FILE

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["step", "train_loss", "heldout_loss", "heldout_mlm_acc", "lr", "step_time_ms"]


def learning_rate(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay from peak to 10% of peak."""
    w = max(1, int(round(warmup * total)))
    if step < w:
        return peak * (step + 1) / w
    frac = (step - w) / max(1, total - w)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, tok_info: dict, seed: int, batch_size: int, device, amp) -> dict:
    """Held-out MLM loss (mean and per-token standard deviation), accuracy and token count, and the
    per-token ``labels``, ``correct`` and ``token_loss`` arrays (in the fixed order of
    :func:`heldout_batches`, the same for every run: the paired comparisons of C4 need them), with
    each token's ``window`` (its row of ``ids``)."""
    model.eval()
    losses, hits, targets, windows = [], [], [], []
    start = 0
    for x, pos, labels in heldout_batches(ids, tok_info, seed, batch_size):
        with amp():
            logits = model(x.to(device), pos.to(device))
        losses.append(F.cross_entropy(logits.float(), labels.to(device), reduction="none").cpu())
        hits.append(logits.argmax(-1).cpu() == labels)
        targets.append(labels)
        windows.append(start + torch.div(pos, x.shape[1], rounding_mode="floor"))
        start += x.shape[0]
    model.train()
    loss = torch.cat(losses).double()
    correct = torch.cat(hits)
    return {
        "loss": float(loss.mean()),
        "loss_sd": float(loss.std()),
        "acc": float(correct.double().mean()),
        "tokens": len(loss),
        "labels": torch.cat(targets).numpy().astype(np.int32),
        "correct": correct.numpy(),
        "token_loss": loss.numpy().astype(np.float32),
        "window": torch.cat(windows).numpy().astype(np.int32),
    }


def write_token_scores(path, ev: dict, shuffled: dict) -> None:
    """The per-token record of a run's final evaluation (``heldout_tokens.npz``; docs/data-contract.md):
    labels, correct (bool), loss (float32) on the held-out windows, and correct on their shuffled
    copies; each token's window and, where the windows file records them, its document."""
    extra = {"document": ev["document"]} if "document" in ev else {}
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                labels=ev["labels"],
                correct=ev["correct"],
                loss=ev["token_loss"],
                correct_shuffled=shuffled["correct"],
                window=ev["window"],
                **extra,
            )


def _load_data(tokenizer_dir, windows, seq_len: int):
    tok = load_tokenizer(tokenizer_dir)
    tok_info = {"special_ids": sorted(set(tok.all_special_ids)), "vocab_size": len(tok), "mask_id": tok.mask_token_id}
    with np.load(windows) as w:
        train_ids = torch.from_numpy(w["fit"].astype(np.int64))
        held_ids = torch.from_numpy(w["heldout"].astype(np.int64))
    if train_ids.shape[1] != seq_len:
        raise InputError(
            windows, f"windows of {train_ids.shape[1]} tokens, expected seq_len {seq_len}", "re-run train_data"
        )
    log.info(
        "%d training windows, %d held-out windows of %d tokens; vocabulary %d",
        len(train_ids),
        len(held_ids),
        seq_len,
        len(tok),
    )
    return tok, tok_info, train_ids, held_ids


def _build_model(mode, variant, s, seed, settings: Training, vocab_size, stats, init_dir) -> MLM:
    torch.manual_seed(seed)
    model = MLM(encoder_config(settings.model, vocab_size, settings.seq_len))
    if mode == "finetune":
        if init_dir is None:
            raise InputError(
                "init_dir",
                "finetune mode needs the trained exact model (init_dir)",
                "pass the directory of the trained exact scratch model",
            )
        missing, unexpected = model.load_state_dict(load_file(str(Path(init_dir) / "mlm.safetensors")), strict=False)
        if missing or unexpected:
            raise InputError(
                init_dir,
                f"checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
                "re-run the exact scratch run with this training.model",
            )
    attach_variant(
        model,
        variant,
        s,
        settings.seq_len,
        stats,
        estimator=settings.estimator,
        strategy=settings.strategy,
        ridge=settings.ridge,
        rank=settings.eigenspace_rank,
        seed=seed,
        pinv=settings.pinv,
    )
    return model


def provenance(meta: dict, inputs) -> str:
    """A digest of everything a run's state depends on: its settings (``meta``: the run, the
    training config, the data seed, the code version) and the content of its input files (the
    tokenizer, the windows, the statistics its maps come from, the model it starts from)."""
    h = hashlib.sha256(json.dumps({**meta, "eigenattn_version": __version__}, sort_keys=True).encode())
    for path in inputs:
        for f in sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]:
            h.update(str(f.relative_to(path) if Path(path).is_dir() else f.name).encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def _resume(ckpt: Path, digest: str, model, opt) -> tuple[list, int]:
    """(records, start step) from a checkpoint written for exactly this run and these inputs, else
    from scratch. A checkpoint from other settings or inputs, or one that cannot be read (cut
    short, or not a plain tensor file: it is loaded with ``weights_only``, so it can run no code),
    is logged and deleted."""
    if not ckpt.is_file():
        return [], 0
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("provenance") != digest:
            raise ValueError("written for other settings or inputs (provenance digest differs)")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign checkpoint means: start afresh
        log.warning("discarding checkpoint %s (%s: %s); training starts from step 0", ckpt, type(e).__name__, e)
        ckpt.unlink(missing_ok=True)
        return [], 0
    log.info("resumed from checkpoint %s at step %d", ckpt, state["step"])
    return state["records"], int(state["step"])


def _publish(out_dir: Path, model: MLM, tok, metrics: pd.DataFrame, final: dict, ev: dict, shuffled: dict) -> None:
    """model/ (HF encoder + tokenizer + the full MLM state), metrics.csv, heldout_tokens.npz,
    final.json (last, so a run folder with final.json is complete); each atomic."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(out_dir / "model", directory=True) as tmp:
        save_file(state, str(tmp / "mlm.safetensors"))
        detach_all(model.encoder)
        model.encoder.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    write_table(metrics, out_dir / "metrics.csv")
    write_token_scores(out_dir / TOKENS_FILE, ev, shuffled)
    with atomic_output(out_dir / "final.json") as tmp:
        tmp.write_text(json.dumps(final, indent=2))


def run(
    out_dir,
    *,
    mode: str,
    variant: str,
    s: int,
    seed: int,
    settings: Training,
    tokenizer_dir,
    windows,
    stats=None,
    init_dir=None,
    device="cpu",
    progress: bool = True,
) -> dict:
    """One training run into ``out_dir``: metrics.csv, final.json, model/ (and checkpoint.pt while running).

    ``windows``: the .npz of :func:`eigenattn.training.data.build_windows`; ``settings``: the run's
    hyper-parameters (:class:`Training`; its ``data_seed`` fixes the held-out masks).
    """
    seq_len, data_seed = settings.seq_len, settings.data_seed
    if variant not in VARIANTS:
        raise ConfigError("training.variants", f"unknown variant '{variant}'", f"use one of {', '.join(VARIANTS)}")
    if mode not in MODES:
        raise ConfigError("training.modes", f"unknown mode '{mode}'", f"use one of {', '.join(MODES)}")
    if variant != "exact" and not 1 <= s <= seq_len:
        raise ConfigError(
            "training.subset_sizes",
            f"subset size s={s} is outside 1..{seq_len}",
            f"use subset sizes between 1 and sampling.seq_len = {seq_len}",
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    cuda = device.type == "cuda"

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    tok, tok_info, train_ids, held_ids = _load_data(tokenizer_dir, windows, seq_len)
    model = _build_model(mode, variant, s, seed, settings, len(tok), stats, init_dir).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    bs = settings.batch_size
    steps = settings.steps if mode == "scratch" else settings.finetune_steps
    peak = settings.lr if mode == "scratch" else settings.finetune_lr

    ckpt = out_dir / "checkpoint.pt"
    meta = {
        "mode": mode,
        "variant": variant,
        "s": s,
        "seed": seed,
        "steps": steps,
        "batch_size": bs,
        "seq_len": seq_len,
        "n_params": n_params,
        "tcfg": json.loads(json.dumps(settings.params(), sort_keys=True)),
    }  # the key its readers know
    inputs = [tokenizer_dir, windows, *([stats.path] if stats is not None else []), *([init_dir] if init_dir else [])]
    digest = provenance({**meta, "data_seed": data_seed}, inputs)
    records, start = _resume(ckpt, digest, model, opt)
    if start == 0 and mode == "finetune":
        ev = evaluate(model, held_ids, tok_info, data_seed, bs, device, amp)
        records.append(
            {
                "step": 0,
                "train_loss": float("nan"),
                "heldout_loss": ev["loss"],
                "heldout_mlm_acc": ev["acc"],
                "lr": 0.0,
                "step_time_ms": float("nan"),
            }
        )
        log.info("step 0 (before fine-tuning): heldout loss %.4f acc %.4f", ev["loss"], ev["acc"])

    n_train = len(train_ids)
    perms = {}

    def order(j):  # the j-th training example of this seed: a fresh permutation per epoch
        e = j // n_train
        if e not in perms:
            perms[e] = np.random.default_rng([seed, e]).permutation(n_train)
        return perms[e][j % n_train]

    ev: dict = {}
    window_loss, window_time, window_n = 0.0, 0.0, 0
    bar = tqdm(
        total=steps, initial=start, desc=f"{mode}/{variant}/s{s}/seed{seed}", disable=not progress, mininterval=5.0
    )
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = [order(j) for j in range(step * bs, (step + 1) * bs)]
        x, pos, labels = mask_batch(train_ids[idx], tok_info, torch.Generator().manual_seed(seed * 1_000_003 + step))
        torch.manual_seed(seed * 1_000_003 + step)  # dropout draws
        lr = learning_rate(step, steps, peak, settings.warmup)
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
        if done % settings.log_every == 0 or done == steps:
            rec = {
                "step": done,
                "train_loss": window_loss / window_n,
                "heldout_loss": float("nan"),
                "heldout_mlm_acc": float("nan"),
                "lr": lr,
                "step_time_ms": 1000 * window_time / window_n,
            }
            if done % settings.eval_every == 0 or done == steps:
                ev = evaluate(model, held_ids, tok_info, data_seed, bs, device, amp)
                rec["heldout_loss"], rec["heldout_mlm_acc"] = ev["loss"], ev["acc"]
                log.info(
                    "step %d: train loss %.4f, heldout loss %.4f, acc %.4f, %.1f ms/step",
                    done,
                    rec["train_loss"],
                    rec["heldout_loss"],
                    rec["heldout_mlm_acc"],
                    rec["step_time_ms"],
                )
            records.append(rec)
            window_loss, window_time, window_n = 0.0, 0.0, 0
            if done % settings.checkpoint_every == 0 and done < steps:
                with atomic_output(ckpt) as tmp:
                    torch.save(
                        {
                            "provenance": digest,
                            "model": model.state_dict(),
                            "optimizer": opt.state_dict(),
                            "records": records,
                            "step": done,
                        },
                        tmp,
                    )
    bar.close()

    metrics = pd.DataFrame.from_records(records, columns=METRIC_COLUMNS)
    for i, (key, value) in enumerate({"mode": mode, "variant": variant, "subset_size": s, "seed": seed}.items()):
        metrics.insert(i, key, value)  # each file names its own run
    last = metrics.dropna(subset=["heldout_mlm_acc"]).iloc[-1]
    timed = metrics[metrics.step > 0].step_time_ms.dropna()
    shuffled = evaluate(
        model, shuffle_windows(held_ids, tok_info["special_ids"], data_seed), tok_info, data_seed, bs, device, amp
    )
    m = settings.model
    final = {
        "mode": mode,
        "variant": variant,
        "subset_size": s,
        "seed": seed,
        "steps": steps,
        "heldout_mlm_acc": float(last.heldout_mlm_acc),
        "heldout_loss": float(last.heldout_loss),
        "heldout_loss_sd": ev["loss_sd"],
        "heldout_mlm_acc_shuffled": shuffled["acc"],
        **unigram_baseline(train_ids, held_ids, tok_info, data_seed, bs),
        "params": n_params,
        "trainable_params": sum(p.numel() for p in params),
        "attention_flops_per_seq": attention_flops_per_seq(
            variant, seq_len, s, m.layers, m.heads, m.d_model // m.heads
        ),
        "mean_step_time_ms": float(timed.mean()) if len(timed) else float("nan"),
        "device": str(device),
        "seq_len": seq_len,
        "vocab_size": len(tok),
        "tokenizer_sha256": sha256_file(Path(tokenizer_dir) / "tokenizer.json"),
    }
    if mode == "finetune":
        final["heldout_mlm_acc_step0"] = float(metrics.iloc[0].heldout_mlm_acc)
    with np.load(windows) as w:  # each held-out token's document: the unit of C4's token part
        if "heldout_documents" in w.files:
            ev["document"] = w["heldout_documents"][ev["window"]]
    _publish(out_dir, model, tok, metrics, final, ev, shuffled)
    ckpt.unlink(missing_ok=True)
    log.info("final: %s", final)
    return final
