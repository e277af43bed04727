"""Run a model over passages and write its pre-softmax scores to a Zarr v3 store.

Store layout (one group per shard; see docs/data-contract.md and docs/models.md):

    scores          (N, L, H, n, n)  float16|float32  chunks (B, 1, H, n, n)
    input_ids       (N, n)           int32
    attention_mask  (N, n)           int8
    passage_id      (N,)             int64
    sinks           (L, H)           float32          only for models with attention sinks

Before the store is created, an equivalence probe (``eigenattn.capture.probe``) checks the model against
its own eager attention and refuses it, with a message naming it, if the scores would not
reproduce the model's probabilities; each layer's mask kind goes into ``attrs["layer_masks"]``.
The probe also measures the scores as stored (cast to float16 and float32), which decides the
dtype: ``dtype="auto"`` stores float16 where its cast reproduces the probabilities within
``probe.STORED_PROB_TOL`` and float32 where not; an explicit float16 that fails is refused
(ConfigError) before any store exists. ``attrs["dtype"]`` is the dtype stored,
``attrs["dtype_requested"]`` the one asked for.

The store is written under a temporary sibling name and renamed into place only once every
array and attribute is written, so an interrupted run never leaves a store that looks complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from eigenattn import SCORE_DEFINITION
from eigenattn.capture.interface import ScoreCapture, capturing
from eigenattn.capture.masks import describe
from eigenattn.capture.probe import (
    PROBE_SEQUENCES,
    STORE_DTYPES,
    equivalence_probe,
    load_capture_model,
    mask_info,
    masks_at_length,
    resolve_store_dtype,
)
from eigenattn.corpus.passages import tokenize_passages
from eigenattn.errors import ConfigError, UnsupportedModelError
from eigenattn.storage.score_writer import ScoreWriter, reuse_freed_memory
from eigenattn.storage.sizes import human, score_store_bytes
from eigenattn.storage.store import create_score_store, new_store

log = logging.getLogger(__name__)

DTYPES = STORE_DTYPES  # extraction.dtype, besides auto
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_facts(model) -> dict:
    cfg = model.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    return {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "model_type": cfg.model_type,
        "n_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "heads": heads,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)),
        "max_positions": int(getattr(cfg, "max_position_embeddings", 0) or 0),
    }


def probe_facts(probe, keep: list[int], label: str, model_type: str) -> dict:
    """Head counts of the kept layers, from what the probe saw (one score array needs one H)."""
    shapes = {k: {probe.shapes[l][k] for l in keep} for k in ("heads", "kv_heads", "head_dim")}
    if len(shapes["heads"]) != 1:
        raise UnsupportedModelError(
            f"layers {keep} have different numbers of query heads ({sorted(shapes['heads'])}),"
            " which one score array (sequence, layer, head, query, key) cannot hold",
            "extract only layers with equal head counts (models.<name>.layers)",
            model=label,
            model_type=model_type,
        )
    return {k: (next(iter(v)) if len(v) == 1 else sorted(v)) for k, v in shapes.items()}


def check_batch(cap: ScoreCapture, keep: list[int], probe, label: str) -> None:
    """Every kept layer was captured, with the mask the probe recorded."""
    missing = [l for l in keep if l not in cap.scores]
    if missing:
        raise RuntimeError(
            f"{label}: no scores captured for layers {missing}: the model does not "
            "route attention through AttentionInterface"
        )
    seen = {}  # layers usually share one mask tensor
    for l in keep:
        m = cap.masks.get(l)
        if id(m) not in seen:
            # the batch's own length: a streamed run probes a prefix (probe_len) and checks each
            # batch's masks at its full length here
            seen[id(m)] = mask_info(m, probe.seq_len if m is None else int(m.shape[-1]))[0]
        info = seen[id(m)]
        if info != probe.masks[l]:
            raise RuntimeError(
                f"{label}: layer {l} received a mask ({info}) that differs from the one recorded for it "
                f"({probe.masks[l]}, read at {probe.mask_tokens or probe.seq_len} tokens)"
            )


def resolve_layers(layers, n_layers: int, key: str = "models.<name>.layers") -> list[int]:
    """The kept layer indices: ``all``, a list, or ``{"of": layers, "at_most": k}`` (k of those,
    evenly spread with the first and last included). ``key``: the config key ``layers`` came from."""
    if isinstance(layers, dict):
        base = resolve_layers(layers["of"], n_layers, key)
        k = min(int(layers["at_most"]), len(base))
        return [base[i] for i in sorted(set(np.round(np.linspace(0, len(base) - 1, k)).astype(int)))]
    if layers in (None, "all"):
        return list(range(n_layers))
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if x < 0 or x >= n_layers]
    if bad:
        raise ConfigError(
            key,
            f"layer(s) {bad} out of range for a model with {n_layers} layers",
            f"list layers between 0 and {n_layers - 1}, or write all",
        )
    return out


def extract_scores(
    model_dir,
    texts,
    passage_ids,
    out_path,
    *,
    seq_len: int,
    dtype: str,
    batch_size: int,
    chunk_sequences: int,
    device: torch.device,
    autocast: str,
    layers,
    compression: str,
    attrs: dict | None = None,
    progress: bool = True,
    check_facts=None,
    check_size=None,
) -> dict:
    """Extract the scores of every passage into a new Zarr store at ``out_path``.

    Returns a dict of timings and sizes. ``attrs`` are merged into the group attributes.
    ``check_facts``, if given, is called with what the equivalence probe found (``n_layers``,
    ``heads``, ``causal``, ``mask_kinds``) before any store exists, so a caller can refuse a model
    that does not match what it expected; ``check_size``, if given, with the bytes the store will
    take (:func:`eigenattn.storage.sizes.score_store_bytes`, once layers, heads and dtype are
    known), so a caller can refuse a store that cannot fit the disk. ``dtype``: ``auto``, ``float16`` or ``float32``
    (:func:`eigenattn.capture.probe.resolve_store_dtype` decides ``auto`` from the probe).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError("extraction.dtype", f"unknown dtype '{dtype}'", "use auto, float16 or float32")
    if batch_size % chunk_sequences:
        raise ConfigError(
            "extraction.batch_size",
            f"{batch_size} is not a multiple of extraction.chunk_sequences = {chunk_sequences}",
            "make extraction.batch_size a multiple of extraction.chunk_sequences",
        )
    check_autocast(autocast)
    prep = prepare_capture(
        model_dir,
        texts,
        seq_len=seq_len,
        device=device,
        layers=layers,
        name=(attrs or {}).get("model"),
        check_facts=check_facts,
    )
    model, ids, probe, facts, keep, label, dev = (
        prep.model,
        prep.ids,
        prep.probe,
        prep.facts,
        prep.keep,
        prep.label,
        prep.device,
    )
    # before any store exists: float16 is stored only where its cast reproduces the probabilities
    requested, dtype = dtype, resolve_store_dtype(probe, dtype, label, keep)  # the dtype stored, from here on
    n_seq, L, H = len(ids), len(keep), facts["heads"]
    store_dtype = DTYPES[dtype]
    sinks = [l for l in keep if l in probe.sinks]
    nbytes = score_store_bytes(n_seq, L, H, seq_len, dtype, chunk_sequences, batch_size, sinks=bool(sinks))
    log.info("score store %s: %d sequences x %d layers x %d heads = %s", out_path, n_seq, L, H, human(nbytes))
    if check_size is not None:
        check_size(nbytes)

    out_path = Path(out_path)
    reuse_freed_memory()
    t0 = time.perf_counter()
    with new_store(out_path) as root:
        scores = create_score_store(
            root,
            ids=ids,
            passage_ids=passage_ids,
            layers=keep,
            heads=H,
            kv_heads=facts["kv_heads"],
            seq_len=seq_len,
            dtype=dtype,
            compression=compression,
            chunk_sequences=chunk_sequences,
            shard_sequences=batch_size,
        )
        write_sinks(root, prep)

        on_cuda = dev.type == "cuda"
        block_shape = (batch_size, L, H, seq_len, seq_len)
        # the array object itself: its write_empty_chunks=True is not stored in the metadata, and a
        # re-opened array would test every chunk for all-NaN before writing it
        writer = ScoreWriter(scores, block_shape, store_dtype, pin=on_cuda)
        t_loop = time.perf_counter()
        t_fwd = 0.0
        bar = tqdm(
            total=n_seq,
            desc=f"extract {out_path.parent.parent.name}/{out_path.parent.name}",
            unit="seq",
            disable=not progress,
            mininterval=1.0,
        )
        try:
            with torch.inference_mode():
                for start in range(0, n_seq, batch_size):
                    batch = torch.from_numpy(ids[start : start + batch_size].astype(np.int64))
                    if on_cuda:
                        batch = batch.pin_memory().to(dev, non_blocking=True)
                    count = batch.shape[0]
                    slot, buf = writer.acquire()
                    # on CPU each layer is cast straight into the writer's buffer; on CUDA the layers
                    # stay on the device and go to the pinned buffer in one asynchronous copy
                    cap = ScoreCapture(keep, store_dtype, out=None if on_cuda else buf[:count])
                    tf = time.perf_counter()
                    with capturing(cap), autocast_context(autocast, dev):
                        model(input_ids=batch, attention_mask=torch.ones_like(batch))
                    check_batch(cap, keep, probe, label)
                    t_fwd += time.perf_counter() - tf
                    ready = None
                    if on_cuda:
                        buf[:count].copy_(torch.stack([cap.scores[l] for l in keep], dim=1), non_blocking=True)
                        ready = torch.cuda.Event()
                        ready.record()
                    writer.submit(slot, start, count, ready)
                    bar.update(count)
        finally:
            bar.close()
            writer.close()
        t_loop = time.perf_counter() - t_loop

        root.attrs.update(
            {
                **capture_attrs(prep, attrs),
                "dtype": dtype,
                "dtype_requested": requested,
                "compression": compression,
                "equivalence_probe": probe.summary(dtype, keep),
                **autocast_attrs(autocast, dev),
            }
        )
    total = time.perf_counter() - t0
    return {
        "n_sequences": n_seq,
        "dtype": dtype,
        "seconds": total,
        "loop_seconds": t_loop,
        "forward_seconds": t_fwd,
        "bytes_raw": int(n_seq * L * H * seq_len * seq_len * np.dtype(dtype).itemsize),
        "bytes_planned": nbytes,
        "bytes_stored": dir_size(out_path),
    }


def check_autocast(autocast: str) -> None:
    if autocast not in AUTOCAST:
        raise ConfigError("extraction.autocast", f"unknown autocast '{autocast}'", f"use {', '.join(AUTOCAST)}")


def autocast_context(autocast: str, device: torch.device):
    """``extraction.autocast`` for a forward pass, applied the same way on every route (score store,
    streamed moments, recomputed scores): on CUDA only; on CPU the pass runs in float32."""
    amp = AUTOCAST[autocast]
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None and device.type == "cuda")


def autocast_attrs(autocast: str, device: torch.device) -> dict:
    """The store attrs of ``extraction.autocast``: ``autocast``, what the scores were computed with
    (none off CUDA), and ``autocast_requested``, the configured value the readers check."""
    return {"autocast": autocast if device.type == "cuda" else "none", "autocast_requested": autocast}


# Tokens the streamed route's equivalence probe runs over (see prepare_capture).
STREAM_PROBE_LEN = 512


@dataclass
class Prepared:
    """A model loaded for capture over tokenized passages, once the equivalence probe accepted it."""

    tok: Any
    model: Any
    ids: np.ndarray
    probe: Any
    facts: dict
    keep: list[int]
    causal: bool
    label: str
    device: torch.device


def prepare_capture(
    model_dir, texts, *, seq_len, device, layers, name=None, check_facts=None, probe_len: int | None = None
) -> Prepared:
    """Load the model, tokenize ``texts`` to ``seq_len`` and run the equivalence probe; refuse
    (before anything is written) a model whose scores would not reproduce its probabilities, a
    seq_len beyond its positions, or facts that ``check_facts`` rejects. Shared by the score store
    (:func:`extract_scores`) and the streamed statistics (``eigenattn.spectra.streamed``).

    ``probe_len``: probe the first ``probe_len`` tokens of the probe sequences only (default: all
    of them). The probe holds every layer's scores twice (captured and eager), 9 GB for SmolLM2's
    30 layers at n = 2,048, so streamed mode, which stores no score and so needs no dtype measured
    at the full length, probes :data:`STREAM_PROBE_LEN` tokens. A window or chunk as long as that
    prefix looks causal in it, so the masks are then read again from one full-length sequence
    (:func:`eigenattn.capture.probe.masks_at_length`); every batch's masks are checked against
    those (:func:`check_batch`)."""
    dev = torch.device(device)
    label = f"'{name}' at {model_dir}" if name else str(model_dir)
    tok, model = load_capture_model(model_dir, label, dev, None)
    facts = model_facts(model)
    if facts["max_positions"] and seq_len > facts["max_positions"]:
        raise ConfigError(
            "sampling.seq_len",
            f"seq_len {seq_len} exceeds the {facts['max_positions']} positions of the model at {model_dir}",
            f"use a seq_len of at most {facts['max_positions']} "
            "(scaling.lengths and scaling.sample_length in the scaling study)",
        )
    ids = tokenize_passages(tok, texts, seq_len)
    # Refuse before any store exists: the probe compares the capture with the model's eager attention.
    probe_ids = ids[:PROBE_SEQUENCES, : (probe_len or seq_len)]
    probe = equivalence_probe(model, torch.from_numpy(probe_ids.astype(np.int64)).to(dev), label)
    facts["n_layers"] = probe.n_layers
    configured = layers["of"] if isinstance(layers, dict) else layers  # before any thinning to at_most
    wanted = (
        list(range(probe.n_layers))
        if configured in (None, "all")
        else sorted({int(x) for x in configured if 0 <= int(x) < probe.n_layers})
    )
    if probe.seq_len < seq_len and wanted:
        # the probe saw a prefix, where a window or chunk as long as the prefix looks causal: the
        # masks are read again at the run's length (one sequence, no score kept)
        first = torch.from_numpy(ids[:1].astype(np.int64)).to(dev)
        probe.use_masks(masks_at_length(model, first, label, max(wanted)), seq_len)
    if check_facts is not None:
        check_facts(
            {
                "n_layers": probe.n_layers,
                "heads": facts["heads"],
                "causal": probe.causal(wanted),
                "mask_kinds": ", ".join(sorted({describe(probe.masks[l]) for l in wanted})),
            }
        )
    keep = resolve_layers(layers, facts["n_layers"], f"models.{name}.layers" if name else "models.<name>.layers")
    facts.update(probe_facts(probe, keep, label, facts["model_type"]))
    return Prepared(tok, model, ids, probe, facts, keep, bool(probe.causal(keep)), label, dev)


def capture_attrs(prep: Prepared, attrs: dict | None) -> dict:
    """The attrs every output of a capture carries: where the passages come from (``attrs``), the
    model's facts, its kept layers and their masks and modifiers, and the score definition."""
    facts, probe, keep = prep.facts, prep.probe, prep.keep
    return {
        **(attrs or {}),
        **{k: facts[k] for k in ("architecture", "model_type", "heads", "kv_heads", "head_dim")},
        "layers": keep,
        "n_layers_total": facts["n_layers"],
        "seq_len": int(prep.ids.shape[1]),
        "causal": bool(prep.causal),
        "layer_masks": [probe.masks[l] for l in keep],
        "layer_modifiers": [{k: probe.modifiers[l][k] for k in ("softcap", "position_bias", "sinks")} for l in keep],
        "score_definition": SCORE_DEFINITION,
        "device": prep.device.type,
        "special_tokens": describe_special_tokens(prep.tok, prep.ids),
    }


def write_sinks(root, prep: Prepared) -> None:
    """The ``sinks`` array (L, H) of a store, for models whose kept layers have attention sinks."""
    keep, probe = prep.keep, prep.probe
    if not any(l in probe.sinks for l in keep):
        return
    # -inf (no sink) for kept layers without one: softmax then ignores the sink column.
    table = np.full((len(keep), int(prep.facts["heads"])), -np.inf, dtype=np.float32)
    for i, l in enumerate(keep):
        if l in probe.sinks:
            table[i] = probe.sinks[l]
    arr = root.create_array("sinks", data=table, dimension_names=["layer", "head"])
    arr.attrs.update(
        {
            "definition": "per-head sink logit: an extra softmax column that is no token; "
            "P = softmax([S + mask, sink])[..., :n]",
            "layers": keep,
        }
    )


def describe_special_tokens(tok, ids: np.ndarray) -> str:
    first = tok.convert_ids_to_tokens(int(ids[0, 0])) if ids.size else ""
    last = tok.convert_ids_to_tokens(int(ids[0, -1])) if ids.size else ""
    specials = set(tok.all_special_ids)
    return (
        f"tokenizer default special tokens, truncated to seq_len; first token '{first}'"
        f"{' (special)' if ids.size and int(ids[0, 0]) in specials else ''}, last token '{last}'"
        f"{' (special)' if ids.size and int(ids[0, -1]) in specials else ''}"
    )


def dir_size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def shard_passages(passages_path, split: str, shard: int, n_shards: int):
    """The passages of ``split`` that shard ``shard`` of ``n_shards`` extracts (contiguous rows)."""
    df = pd.read_parquet(passages_path)
    df = df[df["split"] == split].sort_values("passage_id").reset_index(drop=True)
    lo, hi = shard * len(df) // n_shards, (shard + 1) * len(df) // n_shards
    if hi <= lo:
        raise ConfigError(
            "extraction.shards",
            f"shard {shard} of {n_shards} has no {split} passages ({len(df)} in total)",
            f"use at most {len(df)} shards, or sample more {split} passages",
        )
    return df.iloc[lo:hi]
