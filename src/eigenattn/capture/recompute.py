"""Token stores, whose scores are recomputed from the model when read (docs/method.md §14).

In streamed mode no score is stored. The fit split's statistics are accumulated during the forward
pass (:mod:`eigenattn.spectra.streamed`); what needs actual scores (the held-out reconstruction
with the peers, the per-input spectrum, fit-split rows for choosing a method) reads a **token
store** instead: the layout of a score store without its ``scores`` array (input_ids,
attention_mask, passage_id and the same attrs, ``route: recompute``), written once the model has
passed the same equivalence probe as for a score store.

:func:`open_token_shard` turns a token store into a :class:`RecomputedScores`, an (N, L, H, n, n)
float32 array that runs the model over the sequences it is asked for, up to the last layer asked
for (:class:`~eigenattn.capture.interface.StopForward`), one chunk of sequences at a time. It
quacks like the checked ``scores`` of a stored shard (shape, dtype, chunks, numpy indexing), so
:func:`eigenattn.storage.store.open_scores` and :class:`eigenattn.storage.score_source.ScoreSource`
read either kind, and the stages that read scores run unchanged.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from eigenattn.capture.extract import (
    STREAM_PROBE_LEN,
    autocast_context,
    capture_attrs,
    check_autocast,
    check_batch,
    prepare_capture,
    write_sinks,
)
from eigenattn.capture.interface import ScoreCapture, StopForward, capturing
from eigenattn.capture.masks import layer_masks
from eigenattn.capture.probe import PROBE_SEQUENCES, equivalence_probe, load_capture_model
from eigenattn.errors import InputError
from eigenattn.storage.store import new_store, open_store

log = logging.getLogger(__name__)

ROUTE = "recompute"


def extract_tokens(
    model_dir,
    texts,
    passage_ids,
    out_path,
    *,
    seq_len: int,
    layers,
    chunk_sequences: int,
    dtype_requested: str,
    device,
    autocast: str,
    attrs: dict | None = None,
    check_facts=None,
) -> dict:
    """A token store for ``texts`` at ``out_path``: the model is loaded, the passages tokenized and
    the equivalence probe run exactly as for a score store, but only tokens and attrs are written.
    ``autocast``: ``extraction.autocast``, recorded as ``autocast_requested``; the readers apply it
    as extraction does (on CUDA only) when they recompute the scores."""
    check_autocast(autocast)
    prep = prepare_capture(
        model_dir,
        texts,
        seq_len=seq_len,
        device=device,
        layers=layers,
        name=(attrs or {}).get("model"),
        check_facts=check_facts,
        probe_len=STREAM_PROBE_LEN,
    )
    ids = prep.ids.astype(np.int32)
    with new_store(out_path) as root:
        whole = (max(len(ids), 1), seq_len)
        root.create_array("input_ids", data=ids, chunks=whole, dimension_names=["sequence", "position"])
        root.create_array(
            "attention_mask",
            data=np.ones_like(ids, dtype=np.int8),
            chunks=whole,
            dimension_names=["sequence", "position"],
        )
        root.create_array("passage_id", data=np.asarray(passage_ids, dtype=np.int64), dimension_names=["sequence"])
        write_sinks(root, prep)
        root.attrs.update(
            {
                **capture_attrs(prep, attrs),
                "route": ROUTE,
                "model_dir": str(model_dir),
                "dtype": "float32",
                "dtype_requested": dtype_requested,
                # applied where the scores are recomputed (none off CUDA), as in extraction
                "autocast": autocast,
                "autocast_requested": autocast,
                "chunk_sequences": int(chunk_sequences),
                "equivalence_probe": prep.probe.summary("float32", prep.keep),
                "definition": "tokens of a split without its scores: readers recompute the float32 scores "
                "S = scale·QKᵀ (+ modifiers) of the listed layers from the model at model_dir",
            }
        )
    return {"n_sequences": len(ids), "layers": prep.keep}


def is_token_store(attrs: dict) -> bool:
    return attrs.get("route") == ROUTE


class _Recapture(ScoreCapture):
    """Computes the scores of ``layers`` (as extraction does) and keeps only those of ``keep``."""

    def __init__(self, layers, keep: set):
        super().__init__(layers, torch.float32)
        self.keep = keep

    def score_blocks(self, layer_idx, n, m):
        return super().score_blocks(layer_idx, n, m) if layer_idx in self.keep else []

    def store_part(self, layer_idx, b, batch, scores):
        if layer_idx in self.keep:
            super().store_part(layer_idx, b, batch, scores)
        else:
            self.scores[layer_idx] = scores.new_empty(0)

    def store(self, layer_idx, scores):
        if layer_idx in self.keep:
            super().store(layer_idx, scores)
        else:
            self.scores[layer_idx] = scores.new_empty(0)


# Bytes of recomputed blocks a RecomputedScores may hold for the reads still to come.
CACHE_BYTES = 4 * 10**9


class RecomputedScores:
    """The (N, L, H, n, n) float32 scores of a token store, computed from the model when indexed.

    Indexing takes a sequence index (slice, int or list) and a layer index first; a read runs the
    model over the chosen sequences, ``chunk`` at a time. The model is loaded, and checked by the
    equivalence probe, on the first read.

    **Once per chunk.** The readers (reconstruction, per-input spectra) take one layer at a time,
    chunk by chunk; rerunning the model up to each layer for each (chunk, layer) costs, for layers
    0, 15 and 29 of 30, 1.57 forward passes per sequence. So a forward pass over a chunk computes
    the layers asked for and every other layer of the store that this chunk has not yet served,
    and holds those blocks (at most ``cache_bytes`` of them) until they are read; a block is
    dropped once read (the last read is kept for readers that take a block a head group at a
    time). A layer never read keeps its block until the array goes. The model runs outside the
    lock: threads recompute different chunks side by side, and a thread that needs a block another
    is computing waits for it. ``forwards`` records each pass as (sequences, last layer reached)."""

    def __init__(self, path, attrs: dict, ids: np.ndarray, device="cpu", model_dir=None, cache_bytes=CACHE_BYTES):
        self.path, self.attrs = str(path), attrs
        self.model_dir = Path(model_dir or attrs["model_dir"])
        self.ids = np.asarray(ids)
        self.layers = [int(x) for x in attrs["layers"]]
        n = int(attrs["seq_len"])
        self.shape = (len(self.ids), len(self.layers), int(attrs["heads"]), n, n)
        self.dtype, self.ndim = np.dtype(np.float32), 5
        chunk = int(attrs.get("chunk_sequences", 8))
        self.chunks = (chunk, 1, self.shape[2], n, n)
        self.device = torch.device(device)
        # extraction.autocast, applied as extraction applies it (on CUDA only)
        self.autocast = str(attrs.get("autocast_requested", "none"))
        check_autocast(self.autocast)
        self.cache_bytes = int(cache_bytes)
        self.forwards: list[tuple[int, int]] = []
        self._model = None
        self._probe = None
        self._cond = threading.Condition()  # Dask's threads share one model and one cache
        self._cache: dict[tuple, np.ndarray] = {}  # (sequences, layer position) -> block, not yet read
        self._held = 0  # bytes of _cache, and of the blocks being computed for it
        self._busy: dict[tuple, set[int]] = {}  # sequences -> layer positions being computed
        self._served: set[tuple] = set()  # (sequences, layer position) already read once
        self._last = None  # (key, block) of the last read
        self._needed = set(range(self.shape[1]))  # the layer positions the readers will take

    def needs(self, positions) -> None:
        """Say which layer positions the readers will take (default: all): a forward pass computes
        ahead only those, and goes no deeper than they need."""
        self._needed = {int(p) for p in positions}

    @property
    def arr(self):  # the checked-array protocol of eigenattn.storage.store
        return self

    def _load(self):
        with self._cond:
            if self._model is None:
                if not (self.model_dir / "config.json").is_file():
                    raise InputError(
                        self.path,
                        f"its scores are recomputed from the model at {self.model_dir}, which holds no config.json",
                        "run the fetch rule of this model (snakemake --forcerun fetch_model)",
                    )
                label = f"'{self.attrs.get('model')}' at {self.model_dir}"
                _, model = load_capture_model(self.model_dir, label, self.device, None)
                probe = self.ids[:PROBE_SEQUENCES, :STREAM_PROBE_LEN]  # as the token store was probed
                probe_ids = torch.from_numpy(probe.astype(np.int64)).to(self.device)
                with torch.inference_mode():
                    self._probe = equivalence_probe(model, probe_ids, label)
                # the token store's masks were read at the full length (the probe saw a prefix, where a
                # long window looks causal); every recomputed batch is checked against them
                self._probe.use_masks(dict(zip(self.layers, layer_masks(self.attrs))), int(self.attrs["seq_len"]))
                self._model, self._label = model, label
            return self._model

    def compute(self, seqs: np.ndarray, layer_pos: list[int]) -> np.ndarray:
        """Scores (len(seqs), len(layer_pos), H, n, n) of the sequences and layer positions. The
        last block is kept, so readers that take one block a head group at a time run the model once."""
        key = (tuple(int(x) for x in seqs), tuple(layer_pos))
        with self._cond:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
        out = np.empty((len(seqs), len(layer_pos), *self.shape[2:]), dtype=np.float32)
        step = self.chunks[0]
        for a in range(0, len(seqs), step):
            part = self._chunk(tuple(int(x) for x in seqs[a : a + step]), list(layer_pos))
            for j, p in enumerate(layer_pos):
                out[a : a + step, j] = part[p]
        with self._cond:
            self._last = (key, out)
        return out

    def _chunk(self, seqs: tuple, want: list[int]) -> dict[int, np.ndarray]:
        """{layer position: (len(seqs), H, n, n)} for the positions ``want``, from the cache or one
        forward pass that also computes the other positions this chunk has still to serve."""
        block = len(seqs) * int(np.prod(self.shape[2:])) * 4
        got: dict[int, np.ndarray] = {}
        while True:
            with self._cond:
                for p in want:
                    if p not in got and (seqs, p) in self._cache:
                        got[p] = self._cache.pop((seqs, p))
                        self._held -= block
                missing = [p for p in dict.fromkeys(want) if p not in got]
                if not missing:
                    self._served.update((seqs, p) for p in want)
                    return got
                busy = self._busy.setdefault(seqs, set())
                if busy & set(missing):  # another thread is computing it: wait for its pass
                    self._cond.wait()
                    continue
                extra = []
                for q in range(self.shape[1]):
                    taken = q in missing or q in busy or (seqs, q) in self._cache or (seqs, q) in self._served
                    if q in self._needed and not taken and self._held + block <= self.cache_bytes:
                        extra.append(q)
                        self._held += block  # reserved for the pass
                busy.update(missing + extra)
            try:
                blocks = self._forward(seqs, sorted(missing + extra))
            except BaseException:
                with self._cond:
                    self._held -= block * len(extra)
                    busy.difference_update(missing + extra)
                    self._cond.notify_all()
                raise
            with self._cond:
                for q in extra:
                    self._cache[(seqs, q)] = blocks[q]
                for p in missing:
                    got[p] = blocks[p]
                busy.difference_update(missing + extra)
                self._cond.notify_all()

    def _forward(self, seqs: tuple, positions: list[int]) -> dict[int, np.ndarray]:
        """One forward pass over ``seqs``, up to the last of the layer ``positions``."""
        model = self._load()
        want = {self.layers[p]: p for p in positions}
        last = max(want)
        # every stored layer up to the last one wanted runs the capture's eager attention, as in a
        # score store's extraction (SDPA differs in the last float32 bits)
        computed = [l for l in self.layers if l <= last]
        cap = _Recapture(computed, set(want))
        cap.stop_after = last
        batch = torch.from_numpy(self.ids[list(seqs)].astype(np.int64)).to(self.device)
        with torch.inference_mode():
            try:
                with capturing(cap), autocast_context(self.autocast, self.device):
                    model(input_ids=batch, attention_mask=torch.ones_like(batch))
            except StopForward:
                pass
        check_batch(cap, computed, self._probe, self._label)
        with self._cond:
            self.forwards.append((len(seqs), last))
        return {p: cap.scores[layer].float().cpu().numpy() for layer, p in want.items()}

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (5 - len(key))
        seqs = np.arange(self.shape[0])[key[0]]
        layers = np.arange(self.shape[1])[key[1]]
        x = self.compute(np.atleast_1d(seqs), [int(i) for i in np.atleast_1d(layers)])
        x = x[(slice(None), slice(None), *key[2:])].copy()  # the cached block stays as it is
        if np.ndim(layers) == 0:
            x = x[:, 0]
        if np.ndim(seqs) == 0:
            x = x[0]
        return x


def open_token_shard(path, attrs: dict, device=None) -> RecomputedScores:
    """The recomputed scores of one token store (opened and checked by the caller); on the GPU
    when one is present, unless ``device`` says otherwise."""
    root = open_store(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return RecomputedScores(path, attrs, root["input_ids"][:], device=device)
