"""Row moments accumulated during the forward pass, with no score store (docs/method.md §14).

Everything the eigen stage takes from the fit split's scores is a per-head moment of the rows of
each view and variant: count, mean and M2 (docs/method.md §3), whole and per split half. In
streamed mode a :class:`MomentCapture` receives each layer's scores from the capture backend the
moment they are computed, one sequence at a time, turns them into float64 moments on the scores'
device (the GPU when there is one) and merges them by the parallel (Chan) update; the scores are
then dropped. So nothing of size N·n² is ever written or held, and memory is the accumulators:
per layer and head, (d + 2)·d float64 per view, variant and half.

One job handles one **layer group** (a slice of the kept layers, sized so that its accumulators fit
``extraction.stream_memory_gb``) of one **sequence shard**: each is its own Snakemake job, so a
long-context run spreads over as many cores, GPUs or nodes as there are jobs. A pass stops at the
group's last layer (:class:`~eigenattn.capture.interface.StopForward`). The shards' moments merge
by the same exact update (:func:`merge_moment_files`) into the packed halves a and b that the
stored route reduces from its chunks (:func:`eigenattn.spectra.rows.row_spectrum`), and the eigen
stage writes rows.zarr and halves.zarr from them with the same code: one data contract for both.

The spectra stage drives the capture here; the capture package never imports the spectra.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eigenattn.capture.extract import (
    STREAM_PROBE_LEN,
    autocast_attrs,
    autocast_context,
    capture_attrs,
    check_autocast,
    check_batch,
    prepare_capture,
)
from eigenattn.capture.interface import ScoreCapture, StopForward, capturing
from eigenattn.config.views import view_slices
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.moments import merge_packed, pack, too_few_chunks, unpack
from eigenattn.storage.sizes import moment_layer_bytes
from eigenattn.storage.store import new_store, open_store

log = logging.getLogger(__name__)

HALVES = ("a", "b")
MOMENT_DIMS = ["layer", "head", "moment", "key"]  # moment: count, mean, then the d rows of M2


def layer_group(keep: list[int], group: int, n_groups: int) -> list[int]:
    """The kept layers of group ``group`` of ``n_groups``: contiguous and as even as they can be."""
    if not 0 <= group < n_groups:
        raise ValueError(f"layer group {group} of {n_groups}")
    if n_groups > len(keep):
        raise ConfigError(
            "extraction.layer_groups",
            f"{n_groups} layer groups for {len(keep)} kept layers",
            f"use at most {len(keep)} layer groups (or auto)",
        )
    lo, hi = group * len(keep) // n_groups, (group + 1) * len(keep) // n_groups
    return keep[lo:hi]


class _Moments:
    """count, mean and M2 of one view, variant and half, for every layer of a group and head."""

    def __init__(self, layers: int, heads: int, d: int, device):
        kw = {"dtype": torch.float64, "device": device}
        self.count = [0.0] * layers
        self.mean = torch.zeros(layers, heads, d, **kw)
        self.m2 = torch.zeros(layers, heads, d, d, **kw)

    def add(self, i: int, X: torch.Tensor) -> None:
        """Merge the rows X (heads, m, d) into layer ``i``: the chunk's moments as the stored route
        takes them (XᵀX − m·μμᵀ), then Chan's pairwise update."""
        m = float(X.shape[1])
        mean_b = X.mean(dim=1)
        m2_b = torch.matmul(X.transpose(1, 2), X)
        m2_b -= m * mean_b[:, :, None] * mean_b[:, None, :]
        n_a = self.count[i]
        n = n_a + m
        delta = mean_b - self.mean[i]
        self.mean[i] += delta * (m / n)
        self.m2[i] += m2_b + (n_a * m / n) * (delta[:, :, None] * delta[:, None, :])
        self.count[i] = n

    def packed(self) -> np.ndarray:
        """(layers, heads, d + 2, d) float64, as :func:`eigenattn.spectra.moments.pack` lays it out."""
        heads = self.mean.shape[1]
        count = np.repeat(np.asarray(self.count, dtype=np.float64)[:, None], heads, axis=1)
        return pack(count, self.mean.cpu().numpy(), self.m2.cpu().numpy())


class MomentCapture(ScoreCapture):
    """A capture that keeps no scores: each kept layer's scores go straight into the float64 row
    moments of every view and variant, in the half of the fit split their sequence belongs to.

    ``views``: view name -> (query slice, key slice); ``split``: the first global sequence index of
    half b. Call :meth:`begin` before each batch with the global index of its first sequence.
    ``computed``: the layers whose scores the capture computes (default ``layers``). Give every
    kept layer up to the group's last, so that they run the capture's eager attention as in a
    score store's extraction, not SDPA: the two differ in the last float32 bits, which the layers
    above would inherit.
    """

    def __init__(self, layers, heads: int, views: dict, split: int, device, computed=None):
        super().__init__(sorted(set(layers) | set(computed or ())), torch.float32)
        self.order = {int(l): i for i, l in enumerate(layers)}
        self.views = views
        self.split = int(split)
        # raw moments only: a row-centred row is P x with P = I − 11ᵀ/d, so its moments are P μ and
        # P M2 P (:func:`centre_rows`), exactly; one GEMM per view serves both variants
        self.acc = {
            (v, h): _Moments(len(self.order), heads, ks.stop - ks.start, device)
            for v, (qs, ks) in views.items()
            for h in HALVES
        }
        self.first = 0
        self.stop_after = max(self.order)

    def begin(self, first: int) -> None:
        """Start a batch whose first sequence has global index ``first`` (per-pass records cleared)."""
        self.first = int(first)
        self.scores, self.masks, self.sinks, self.modifiers, self.shapes, self.owners = {}, {}, {}, {}, {}, {}
        self.mask, self.calls = None, 0

    def _add(self, layer_idx: int, g: int, S: torch.Tensor) -> None:
        if layer_idx not in self.order:  # computed as in extraction, not this group's
            return
        i, half = self.order[layer_idx], "a" if g < self.split else "b"
        for v, (qs, ks) in self.views.items():
            self.acc[(v, half)].add(i, S[:, qs, ks].to(torch.float64))  # rows (heads, |Q|, d)

    def store_part(self, layer_idx: int, b: int, batch: int, scores: torch.Tensor) -> None:
        self._add(layer_idx, self.first + b, scores.detach())
        self.scores[layer_idx] = scores.new_empty(0)  # seen (check_batch), nothing kept

    def store(self, layer_idx: int, scores: torch.Tensor) -> None:
        for b in range(scores.shape[0]):
            self._add(layer_idx, self.first + b, scores[b].detach().float())
        self.scores[layer_idx] = scores.new_empty(0)

    def packed(self) -> dict:
        """{(view, half): (layers, heads, d + 2, d) float64 packed moments of the raw rows}."""
        return {k: a.packed() for k, a in self.acc.items()}


def centre_rows(packed: np.ndarray) -> np.ndarray:
    """The packed moments of row-centred rows P x (P = I − 11ᵀ/d) from those of the rows x:
    mean P μ and M2 P M2 P. Exact: centring is linear, so it commutes with the moments."""
    count, mean, m2 = unpack(packed)
    d = mean.shape[-1]
    r = m2.sum(axis=-1, keepdims=True) / d  # M2 1 / d, a column
    c = m2.sum(axis=-2, keepdims=True) / d  # 1ᵀ M2 / d, a row
    t = m2.sum(axis=(-2, -1), keepdims=True) / (d * d)
    return pack(count, mean - mean.mean(axis=-1, keepdims=True), m2 - r - c + t)


def stream_moments(
    model_dir,
    texts,
    passage_ids,
    out_path,
    *,
    seq_len: int,
    layers,
    group: int,
    n_groups: int,
    views,
    first_index: int,
    split_sequence: int,
    batch_size: int,
    device,
    autocast: str = "none",
    attrs: dict | None = None,
    check_facts=None,
    progress: bool = True,
) -> dict:
    """The row moments of one layer group over ``texts`` (one sequence shard of the fit split) into
    a new moments store at ``out_path``; no score is written. ``first_index``: the global index of
    the shard's first sequence, ``split_sequence``: the first sequence of half b
    (:func:`eigenattn.config.plan.fit_halves_split`). The model passes the same equivalence probe as for a
    score store. ``autocast``: ``extraction.autocast``, applied as in extraction (on CUDA only).
    Returns timings and sizes."""
    check_autocast(autocast)
    prep = prepare_capture(
        model_dir,
        texts,
        seq_len=seq_len,
        device=device,
        layers=layers,
        name=(attrs or {}).get("model"),
        check_facts=check_facts,
        probe_len=STREAM_PROBE_LEN,  # looked up when called (a test shortens it)
    )
    keep = layer_group(prep.keep, group, n_groups)
    slices = {v: view_slices(v, seq_len, prep.causal) for v in views}
    heads = int(prep.facts["heads"])
    computed = [l for l in prep.keep if l <= max(keep)]
    cap = MomentCapture(keep, heads, slices, split_sequence, prep.device, computed=computed)
    acc_bytes = moment_layer_bytes(heads, [ks.stop - ks.start for _, ks in slices.values()]) * len(keep)
    log.info(
        "streamed moments %s: %d sequences, layers %s, views %s; accumulators %.2f GB",
        out_path,
        len(prep.ids),
        keep,
        list(views),
        acc_bytes / 1e9,
    )
    n_seq = len(prep.ids)
    on_cuda = prep.device.type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(total=n_seq, desc=f"moments {Path(out_path).name}", unit="seq", disable=not progress, mininterval=1.0)
    try:
        with torch.inference_mode():
            for start in range(0, n_seq, batch_size):
                batch = torch.from_numpy(prep.ids[start : start + batch_size].astype(np.int64))
                if on_cuda:
                    batch = batch.pin_memory().to(prep.device, non_blocking=True)
                cap.begin(first_index + start)
                try:
                    with capturing(cap), autocast_context(autocast, prep.device):
                        prep.model(input_ids=batch, attention_mask=torch.ones_like(batch))
                except StopForward:
                    pass
                check_batch(cap, computed, prep.probe, prep.label)
                bar.update(batch.shape[0])
    finally:
        bar.close()
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    packed = cap.packed()
    probe_keep = prep.keep
    with new_store(out_path) as root:
        for (v, h), arr in packed.items():
            g = root.require_group(v)
            # uncompressed: float64 moments barely compress, and the bytes written then do not depend on N
            g.create_array(h, data=arr, chunks=(1, *arr.shape[1:]), compressors=None, dimension_names=MOMENT_DIMS)
        group_idx = [probe_keep.index(l) for l in keep]
        base = capture_attrs(prep, attrs)
        root.attrs.update(
            {
                **base,
                "layers": keep,
                "layer_masks": [base["layer_masks"][i] for i in group_idx],
                "layer_modifiers": [base["layer_modifiers"][i] for i in group_idx],
                "analysis": "streamed_moments",
                "views": list(views),
                "layer_group": [int(group), int(n_groups)],
                "first_sequence": int(first_index),
                "n_sequences": int(n_seq),
                "passage_id": [int(x) for x in np.asarray(passage_ids)],
                "split_sequence": int(split_sequence),
                "dtype": "float32",
                "dtype_requested": "streamed",
                **autocast_attrs(autocast, prep.device),
                "equivalence_probe": prep.probe.summary("float32", probe_keep),
                "definition": "packed float64 moments of the raw rows S[i, keys] of the view's queries, per "
                "layer and head: [0] count, [1] mean, [2:] M2 = Σ (x − mean)(x − mean)ᵀ, for the sequences "
                "of this shard in half a (global index < split_sequence) and half b; the row-centred "
                "variant's moments follow exactly (eigenattn.spectra.streamed.centre_rows)",
            }
        )
    return {"n_sequences": n_seq, "layers": keep, "seconds": seconds, "accumulator_bytes": acc_bytes}


# the dtype keys of a score store's expectations: streamed moments come from float32 scores, never stored
NOT_STREAMED = ("dtype", "dtype_requested")


def merge_moment_files(paths, view: str, variants, expect: dict | None = None) -> tuple[dict, dict]:
    """Merge the moments stores of one model (every layer group and sequence shard) for ``view``.

    Returns ({variant: {"a": packed, "b": packed}} with layers in model order, attrs) where
    ``packed`` is (L, H, d + 2, d); attrs are the first group's, with every group's layers, masks
    and modifiers, and the total sequence count. Shards are merged by the exact parallel update, so
    the result equals one pass over all sequences to rounding."""
    groups: dict[int, list] = {}
    first = None
    for p in paths:
        root = open_store(p)
        a = dict(root.attrs)
        if a.get("analysis") != "streamed_moments":
            raise InputError(p, "not a streamed moments store", "re-run the stream_moments rule that writes it")
        if view not in a["views"]:
            raise InputError(
                p,
                f"holds views {a['views']}, not view '{view}'",
                "re-run the stream_moments rules with the current eigen.views",
            )
        for key, want in (expect or {}).items():
            if key not in NOT_STREAMED and a.get(key) != want:
                raise InputError(
                    p,
                    f"written with {key} = {a.get(key)!r}, but this stage expects {want!r}: the store is stale",
                    "re-run the stream_moments rules (snakemake --forcerun stream_moments)",
                )
        first = first or a
        if (a["seq_len"], a["split_sequence"], a["layer_group"][1], a.get("autocast"), a.get("autocast_requested")) != (
            first["seq_len"],
            first["split_sequence"],
            first["layer_group"][1],
            first.get("autocast"),
            first.get("autocast_requested"),
        ):
            raise InputError(
                p, "was written with another seq_len, split, layer grouping or autocast", "re-run stream_moments"
            )
        groups.setdefault(int(a["layer_group"][0]), []).append((a, root))
    if not groups:
        raise InputError("streamed moments", "no moments stores given", "run the stream_moments rules first")
    split = int(first["split_sequence"])
    out: dict = {v: {} for v in variants}
    layers, masks, mods = [], [], []
    n_seq = None
    for g in sorted(groups):
        parts = sorted(groups[g], key=lambda t: t[0]["first_sequence"])
        count = sum(int(a["n_sequences"]) for a, _ in parts)
        if n_seq is not None and count != n_seq:
            raise InputError(
                "streamed moments",
                f"layer group {g} covers {count} sequences, another {n_seq}",
                "re-run stream_moments",
            )
        n_seq = count
        if not 0 < split < n_seq:  # one chunk: fit_halves_split puts every sequence in one half
            raise too_few_chunks(
                f"but the fit split's {n_seq} sequences make one (half b would start at sequence {split})"
            )
        a0 = parts[0][0]
        layers += a0["layers"]
        masks += a0["layer_masks"]
        mods += a0["layer_modifiers"]
        for h in HALVES:
            raw = merge_packed(np.stack([np.asarray(r[f"{view}/{h}"][...]) for _, r in parts]), axis=0, keepdims=False)
            for v in variants:
                out[v].setdefault(h, []).append(centre_rows(raw) if v == "row_centered" else raw)
    for v in variants:
        for h in HALVES:
            out[v][h] = np.concatenate(out[v][h], axis=0)
    attrs = {
        **first,
        "layers": layers,
        "layer_masks": masks,
        "layer_modifiers": mods,
        "n_sequences": n_seq,
    }
    return out, attrs
