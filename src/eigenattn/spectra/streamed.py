"""Row moments accumulated during the forward pass, with no score store (docs/method.md §14).

Everything the eigen stage takes from the fit split's scores is a per-head moment of the rows of
each view and variant: count, mean and M2 (docs/method.md §3), whole and per split half. In
streamed mode a :class:`MomentCapture` receives each layer's scores from the capture backend the
moment they are computed, one sequence at a time (only the blocks of the scores that hold a view's
rows; the layers' outputs come from SDPA), and adds them to float64 moments on the scores' device
(the GPU when there is one) as shifted sums with a symmetric rank-|Q| update (:class:`_Moments`);
the scores are then dropped. So nothing of size N·n² is ever written or held, and memory is the
accumulators: per layer and head, (d + 2)·d float64 per view and half (the row-centred variant
follows from the raw moments).

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
from scipy.linalg import blas
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from eigenattn.capture.attention import quadrants
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
from eigenattn.spectra.moments import pack, too_few_chunks, unpack
from eigenattn.storage.sizes import check_group_memory, moment_layer_bytes, moment_work_bytes
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


PRODUCTS = ("float64", "float32")
"""How the row products XᵀX are formed: float64 (the default; streamed equals stored to rounding),
or float32 products of the shifted rows accumulated in float64 per sequence (about twice the
rate; error bound in :func:`float32_product_bound`)."""

U32 = 2.0**-24  # unit roundoff of float32


def float32_product_bound(rows: int, s2_trace):
    """Bound on |Δλ| of every eigenvalue of a head's M2 (and so of its covariance, times 1/(N−1))
    when the products are float32 (``products="float32"``), against exact arithmetic on the same
    float32 scores.

    Per sequence, the shifted rows a = fl(x − K) carry |δa| ≤ u|x − K|, and their float32 product
    P = fl(AᵀA) over ``rows`` = m rows carries |ΔP_jk| ≤ γ_m (|A|ᵀ|A|)_jk with γ_m = m·u/(1 − m·u)
    (Higham, Accuracy and Stability, §3.5), u = 2⁻²⁴. Summed in float64 over the sequences (whose
    own error is ~1e-16 relative), and with Cauchy–Schwarz (|A|ᵀ|A|)_jk ≤ √(S2_jj·S2_kk),
    |ΔS2_jk| ≤ (γ_m + 2u)·√(S2_jj·S2_kk), where S2 = Σ (x − K)(x − K)ᵀ is the shifted sum. The
    mean term S1·S1ᵀ/N adds at most 2u·tr(S2) (Cauchy–Schwarz again). The rank-one matrix
    √(d_j d_k) has spectral norm Σ d_j = tr(S2), so by Weyl's inequality
    |Δλ_i| ≤ ‖ΔM2‖₂ ≤ (γ_m + 4u)·tr(S2). ``s2_trace``: tr(S2) of each head (an array)."""
    m = float(rows)
    gamma = m * U32 / (1 - m * U32)
    return (gamma + 4 * U32) * np.asarray(s2_trace, dtype=np.float64)


class _Moments:
    """count, mean and M2 of one view, variant and half, for every layer of a group and head.

    Accumulated as shifted sums: with K the mean of the first sequence's rows (per head), S1 = Σ
    (x − K) and S2 = Σ (x − K)(x − K)ᵀ over every row; at the end mean = K + S1/N and M2 = S2 −
    S1·S1ᵀ/N. K is within a sequence's spread of the mean, so the subtraction loses nothing
    measurable in float64 (the stored route's chunk moments XᵀX − m·μμᵀ rely on the same), and no
    d × d merge runs per sequence: per sequence and head one pass shifts the rows into a reused
    buffer (the only copy, and float64 only in float64 mode) and one symmetric rank-m update adds
    them to the triangle of S2 (BLAS syrk on CPU, half the multiply-adds of XᵀX; a batched GEMM
    over the heads on CUDA). ``products``: see :data:`PRODUCTS`."""

    def __init__(self, layers: int, heads: int, d: int, device, products: str = "float64"):
        if products not in PRODUCTS:
            raise ConfigError("extraction.stream_products", f"unknown '{products}'", f"use {' or '.join(PRODUCTS)}")
        kw = {"dtype": torch.float64, "device": device}
        self.products = products
        self.dtype = torch.float64 if products == "float64" else torch.float32
        self.count = [0] * layers
        self.shift = torch.zeros(layers, heads, d, **kw)
        self.s1 = torch.zeros(layers, heads, d, **kw)
        self.s2 = torch.zeros(layers, heads, d, d, **kw)  # CPU: the lower triangle only
        self._buf = None  # the shifted rows (heads, m, d), reused
        self._tmp = None  # float32 mode on CPU: one head's float32 product (d, d), reused
        self.rows_per_add = 0

    def _buffer(self, shape, device) -> torch.Tensor:
        if self._buf is None or self._buf.shape != shape:
            self._buf = torch.empty(shape, dtype=self.dtype, device=device)
        return self._buf

    def add(self, i: int, X: torch.Tensor) -> None:
        """Add the rows X (heads, m, d), any float dtype and strides (a view of the scores), to
        layer ``i``."""
        H, m, d = X.shape
        if self.count[i] == 0:
            self.shift[i] = X.to(torch.float64).mean(dim=1)
            if self.dtype == torch.float32:  # the shift used is the float32 one, exactly
                self.shift[i] = self.shift[i].float().double()
        A = self._buffer((H, m, d), X.device)
        torch.sub(X, self.shift[i][:, None, :].to(self.dtype), out=A)  # float64 mode: exact, x widened first
        if A.device.type == "cpu":
            # numpy's float64 sum of float32 rows runs ~7x faster than torch's
            self.s1[i] += torch.from_numpy(A.numpy().sum(axis=1, dtype=np.float64))
            self._syrk(self.s2[i], A)
        elif self.dtype == torch.float64:
            self.s1[i] += A.sum(dim=1)
            self.s2[i].baddbmm_(A.transpose(1, 2), A)
        else:
            self.s1[i] += A.sum(dim=1, dtype=torch.float64)
            self.s2[i] += torch.bmm(A.transpose(1, 2), A)
        self.count[i] += m
        self.rows_per_add = m

    def _syrk(self, S2: torch.Tensor, A: torch.Tensor) -> None:
        """S2[h] += A[h]ᵀ A[h] in the lower triangle, for every head h (BLAS syrk)."""
        d = A.shape[-1]
        for h in range(A.shape[0]):
            a = A[h].numpy().T  # (d, m), Fortran order: syrk's A·Aᵀ is AᵀA of the rows
            c = S2[h].numpy().T  # Fortran view: its upper triangle is the lower one of S2[h]
            if self.dtype == torch.float64:
                out = blas.dsyrk(1.0, a, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
            else:
                if self._tmp is None or self._tmp.shape != (d, d):
                    self._tmp = np.zeros((d, d), dtype=np.float32, order="F")
                out = blas.ssyrk(1.0, a, beta=0.0, c=self._tmp, trans=0, lower=0, overwrite_c=1)
                S2[h] += torch.from_numpy(out.T)  # float32 products accumulated in float64
                continue
            if not np.shares_memory(out, c):
                raise RuntimeError("syrk did not update the accumulator in place")

    def packed(self) -> np.ndarray:
        """(layers, heads, d + 2, d) float64, as :func:`eigenattn.spectra.moments.pack` lays it out:
        count, mean = K + S1/N and M2 = S2 − S1·S1ᵀ/N, written in place into the packed array (on
        CPU, S2 holds a triangle, the other one zeros: S2 + S2ᵀ with its diagonal halved)."""
        L, H, d = self.s1.shape
        out = np.empty((L, H, d + 2, d), dtype=np.float64)
        O = torch.from_numpy(out)
        count = torch.tensor(self.count, dtype=torch.float64)
        safe = count.clamp(min=1)[:, None, None]
        s1 = self.s1.cpu()
        O[..., 0, :] = count[:, None, None]
        O[..., 1, :] = self.shift.cpu() + s1 / safe
        M = O[..., 2:, :]
        S2 = self.s2.cpu()
        c = s1 / safe.sqrt()
        triangle = self.s2.device.type == "cpu"
        for i in range(L):  # one head's d × d at a time: the transposed read stays in cache
            for h in range(H):
                m = M[i, h]
                if triangle:
                    torch.add(S2[i, h], S2[i, h].T, out=m)
                    m.diagonal().mul_(0.5)
                else:
                    m.copy_(S2[i, h])
                m.addr_(c[i, h], c[i, h], alpha=-1.0)
        return out

    def moments(self):
        """(count (layers,), mean (layers, heads, d), M2 (layers, heads, d, d)) as float64 tensors."""
        count, mean, m2 = unpack(self.packed())
        return torch.from_numpy(np.ascontiguousarray(count[:, 0])), torch.from_numpy(mean), torch.from_numpy(m2)

    def product_bound(self) -> np.ndarray:
        """(layers, heads): the bound of :func:`float32_product_bound` on |Δλ| of each head's M2 in
        float32 mode (0 in float64 mode)."""
        if self.products == "float64":
            return np.zeros(self.s1.shape[:2])
        trace = torch.diagonal(self.s2, dim1=-2, dim2=-1).sum(-1).cpu().numpy()
        return float32_product_bound(self.rows_per_add, trace)


class MomentCapture(ScoreCapture):
    """A capture that keeps no scores: each kept layer's scores go straight into the float64 row
    moments of every view and variant, in the half of the fit split their sequence belongs to.

    ``views``: view name -> (query slice, key slice); ``split``: the first global sequence index of
    half b. Call :meth:`begin` before each batch with the global index of its first sequence.
    ``computed``: the layers the capture records (masks checked by ``check_batch``; default
    ``layers``): every kept layer up to the group's last. Only ``layers`` materialise scores, and
    only the blocks that hold a view's rows (:meth:`score_blocks`); every plain layer takes its
    output from SDPA, as on the score store's route, so the layers above see the same bits.
    """

    def __init__(self, layers, heads: int, views: dict, split: int, device, computed=None, products="float64"):
        super().__init__(sorted(set(layers) | set(computed or ())), torch.float32)
        self.order = {int(l): i for i, l in enumerate(layers)}
        self.views = views
        self.split = int(split)
        # raw moments only: a row-centred row is P x with P = I − 11ᵀ/d, so its moments are P μ and
        # P M2 P (:func:`centre_rows`), exactly; one GEMM per view serves both variants
        self.acc = {
            (v, h): _Moments(len(self.order), heads, ks.stop - ks.start, device, products)
            for v, (qs, ks) in views.items()
            for h in HALVES
        }
        self.first = 0
        self.stop_after = max(self.order)

    def begin(self, first: int) -> None:
        """Start a batch whose first sequence has global index ``first`` (per-pass records cleared)."""
        self.first = int(first)
        self.scores, self.masks, self.sinks, self.modifiers, self.shapes, self.owners = {}, {}, {}, {}, {}, {}
        self.mask, self.calls, self._causal = None, 0, {}

    def score_blocks(self, layer_idx: int, n: int, m: int) -> list[tuple[slice, slice]]:
        """The quadrants of the scores that hold a view's rows, in the analysed layers; none in a
        layer computed on the way to them (its scores are never materialised)."""
        if layer_idx not in self.order:
            return []

        def meets(a: slice, b: slice) -> bool:
            return max(a.start, b.start) < min(a.stop, b.stop)

        return [
            (rs, cs)
            for rs, cs in quadrants(n, m)
            if any(meets(rs, qs) and meets(cs, ks) for qs, ks in self.views.values())
        ]

    def _add(self, layer_idx: int, g: int, S: torch.Tensor) -> None:
        if layer_idx not in self.order:  # computed as in extraction, not this group's
            return
        i, half = self.order[layer_idx], "a" if g < self.split else "b"
        for v, (qs, ks) in self.views.items():
            self.acc[(v, half)].add(i, S[:, qs, ks])  # rows (heads, |Q|, d): a view, shifted into the update's buffer

    def store_part(self, layer_idx: int, b: int, batch: int, scores: torch.Tensor) -> None:
        self._add(layer_idx, self.first + b, scores.detach())
        self.scores[layer_idx] = scores.new_empty(0)  # seen (check_batch), nothing kept

    def store(self, layer_idx: int, scores: torch.Tensor) -> None:
        for b in range(scores.shape[0]):
            self._add(layer_idx, self.first + b, scores[b].detach())
        self.scores[layer_idx] = scores.new_empty(0)

    def packed(self) -> dict:
        """{(view, half): (layers, heads, d + 2, d) float64 packed moments of the raw rows}."""
        return {k: a.packed() for k, a in self.acc.items()}


def merge_into(acc: np.ndarray, part: np.ndarray) -> None:
    """Merge the packed moments ``part`` into ``acc`` (both (L, H, d + 2, d)) in place, by Chan's
    pairwise update: n = n_a + n_b, mean_a += δ·n_b/n, M2_a += M2_b + (n_a·n_b/n)·δδᵀ with δ = mean_b −
    mean_a; one head's d × d at a time."""
    A, B = torch.from_numpy(acc), torch.from_numpy(part)
    for i in range(acc.shape[0]):
        for h in range(acc.shape[1]):
            na, nb = float(acc[i, h, 0, 0]), float(part[i, h, 0, 0])
            if nb == 0:
                continue
            if na == 0:
                acc[i, h] = part[i, h]
                continue
            n = na + nb
            delta = B[i, h, 1] - A[i, h, 1]
            A[i, h, 2:] += B[i, h, 2:]
            A[i, h, 2:].addr_(delta, delta, alpha=na * nb / n)
            A[i, h, 1] += delta * (nb / n)
            A[i, h, 0] = n


def centre_rows_into(dst: np.ndarray, packed: np.ndarray) -> None:
    """:func:`centre_rows` of ``packed`` written into ``dst``, one head at a time."""
    d = packed.shape[-1]
    for i in range(packed.shape[0]):
        for h in range(packed.shape[1]):
            m2, out = packed[i, h, 2:], dst[i, h, 2:]
            r = m2.sum(axis=1) / d
            c = m2.sum(axis=0) / d
            np.subtract(m2, r[:, None], out=out)
            out -= c[None, :]
            out += r.sum() / d
            dst[i, h, 0] = packed[i, h, 0]
            dst[i, h, 1] = packed[i, h, 1] - packed[i, h, 1].mean()


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
    autocast: str,
    products: str = "float64",
    stream_memory_gb: float | None = None,
    attrs: dict | None = None,
    check_facts=None,
    progress: bool = True,
) -> dict:
    """The row moments of one layer group over ``texts`` (one sequence shard of the fit split) into
    a new moments store at ``out_path``; no score is written. ``first_index``: the global index of
    the shard's first sequence, ``split_sequence``: the first sequence of half b
    (:func:`eigenattn.config.plan.fit_halves_split`). The model passes the same equivalence probe as for a
    score store. ``autocast``: ``extraction.autocast``, applied as in extraction (on CUDA only);
    ``products``: how the row products are formed (:data:`PRODUCTS`). ``stream_memory_gb``
    (``extraction.stream_memory_gb``), if given: the group's moments must fit it, or the job is
    refused before its first forward pass (a group sized by a plan that did not know the model's
    layers and heads, or an explicit ``extraction.layer_groups``). Returns timings and sizes."""
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
    cap = MomentCapture(keep, heads, slices, split_sequence, prep.device, computed=computed, products=products)
    per_layer = moment_layer_bytes(heads, [ks.stop - ks.start for _, ks in slices.values()])
    acc_bytes = per_layer * len(keep)
    work = moment_work_bytes(
        heads, [(qs.stop - qs.start, ks.stop - ks.start) for qs, ks in slices.values()], seq_len, products
    )
    if stream_memory_gb is not None and acc_bytes > float(stream_memory_gb) * 1e9:
        check_group_memory((attrs or {}).get("model", "<name>"), per_layer, len(keep), len(prep.keep), stream_memory_gb)
    log.info(
        "streamed moments %s: %d sequences, layers %s, views %s; accumulators %.2f GB, work buffers %.2f GB",
        out_path,
        len(prep.ids),
        keep,
        list(views),
        acc_bytes / 1e9,
        work / 1e9,
    )
    n_seq = len(prep.ids)
    on_cuda = prep.device.type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(total=n_seq, desc=f"moments {Path(out_path).name}", unit="seq", disable=not progress, mininterval=1.0)
    try:
        # the moments' BLAS (syrk) takes the job's threads, as torch does
        with torch.inference_mode(), threadpool_limits(torch.get_num_threads(), user_api="blas"):
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
                "moment_products": products,
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
    layers, masks, mods = [], [], []
    n_seq = None
    order = sorted(groups)
    for g in order:
        parts = groups[g] = sorted(groups[g], key=lambda t: t[0]["first_sequence"])
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
    # the merged moments are written into their final arrays, shard by shard, in place: memory holds
    # those (variants × halves) and one shard's part, not a stack of every shard and its copies
    shape = groups[order[0]][0][1][f"{view}/a"].shape[1:]
    out = {v: {h: np.empty((len(layers), *shape), dtype=np.float64) for h in HALVES} for v in variants}
    lo = 0
    for g in order:
        parts = groups[g]
        hi = lo + len(parts[0][0]["layers"])
        for h in HALVES:
            raw = out["raw"][h][lo:hi] if "raw" in out else np.empty((hi - lo, *shape))
            raw[...] = parts[0][1][f"{view}/{h}"][...]
            for _, r in parts[1:]:
                merge_into(raw, np.asarray(r[f"{view}/{h}"][...]))
            if "row_centered" in out:
                centre_rows_into(out["row_centered"][h][lo:hi], raw)
        lo = hi
    attrs = {
        **first,
        "layers": layers,
        "layer_masks": masks,
        "layer_modifiers": mods,
        "n_sequences": n_seq,
    }
    return out, attrs
