"""What a score store takes on disk, and how much the disk has free: the size is known from the
plan before any job runs (:mod:`eigenattn.config.disk`) and again, from the model itself, in the
extraction rule before it writes. Pure arithmetic on the layout of
:func:`eigenattn.storage.store.create_score_store`, without zarr, so the Snakefile can import it."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from eigenattn.errors import ConfigError

ITEMSIZE = {"float16": 2, "float32": 4}

CHECKSUM = 4  # CRC32C after each inner chunk, and after each shard's index
INDEX_ENTRY = 16  # a shard's index: offset and length (two uint64) per inner chunk
METADATA = 64 * 1024  # zarr.json files and consolidated metadata: ~10 KB measured at 2 layers, 30 KB at 30


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def score_array_bytes(
    n_sequences: int, layers: int, heads: int, seq_len: int, itemsize: int, chunk_sequences: int, batch_size: int
) -> int:
    """Bytes of the ``scores`` array of one store, uncompressed (``extraction.compression: none``).

    With N sequences, L layers, H query heads, n = seq_len, s bytes per score, c sequences per
    inner chunk and B per shard (one shard file per extraction batch)::

        ceil(N/c) · L · (c · H · n² · s + 4)  +  ceil(N/B) · (16 · L · B/c + 4)

    Every inner chunk (c sequences × one layer × all heads × n × n) is stored whole, also the
    last, partly filled one, with its 4-byte CRC32C; an inner chunk wholly past the last sequence
    is not written. Each shard file ends in an index of 16 bytes per inner chunk it can hold, and
    its checksum. The whole n × n matrix is stored for every view: a view is a block read from it.
    """
    chunk = chunk_sequences * heads * seq_len * seq_len * itemsize + CHECKSUM
    index = INDEX_ENTRY * layers * (batch_size // chunk_sequences) + CHECKSUM
    return ceil_div(n_sequences, chunk_sequences) * layers * chunk + ceil_div(n_sequences, batch_size) * index


def score_store_bytes(
    n_sequences: int,
    layers: int,
    heads: int,
    seq_len: int,
    dtype: str,
    chunk_sequences: int,
    batch_size: int,
    sinks: bool = False,
) -> int:
    """Bytes of one score store (a shard of a split, or a scaling grid point), an upper bound
    within a few kilobytes for ``extraction.compression: none``:

        scores  (:func:`score_array_bytes`, exact)
        + N · n · (4 + 1)                  input_ids (int32) and attention_mask (int8)
        + 8 · (N + L + 2H + 3n)            coordinates: passage_id, layer, head, kv_head,
                                           query, key, position (int64)
        + 4 · L · H                        sinks (float32), only for models with attention sinks
        + 64 KiB                           metadata

    The small arrays are stored compressed, so they take less than this. ``dtype``: the stored
    dtype (``float16`` or ``float32``). lz4 and zstd shrink the scores by their ratio (1.03 and
    1.11 measured): the uncompressed size stays the bound.
    """
    N, L, H, n = n_sequences, layers, heads, seq_len
    scores = score_array_bytes(N, L, H, n, ITEMSIZE[dtype], chunk_sequences, batch_size)
    return scores + N * n * 5 + 8 * (N + L + 2 * H + 3 * n) + (4 * L * H if sinks else 0) + METADATA


# ------------------------------------------------------------------------------------- the disk

# Room kept free beyond the score stores, for the rest of the run's outputs (spectra, tables,
# checkpoints, logs) and for whatever else writes to the disk meanwhile.
HEADROOM_SHARE = 0.10
HEADROOM_MIN = 2 * 10**9

FREE_ENV = "EIGENATTN_DISK_FREE_GB"


def free_bytes(path) -> int:
    """Free bytes of the file system that ``path`` is (or will be) on: the nearest folder of it that
    exists. ``EIGENATTN_DISK_FREE_GB`` (decimal GB), when set, stands in for the measured value: to
    plan in a dry run for another disk (a cluster's scratch), and in the tests."""
    if (given := os.environ.get(FREE_ENV)) is not None:
        return int(float(given) * 10**9)
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def room(free: int) -> int:
    """Bytes the score stores may take of ``free``: all but the headroom, 10% of it and at least
    2 GB."""
    return free - max(int(HEADROOM_SHARE * free), HEADROOM_MIN)


def human(nbytes: int | float) -> str:
    """Decimal units, three significant figures: 942 GB, 3.54 GB, 50.3 MB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            v = nbytes / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:,.0f} {unit}"
    return f"{int(nbytes)} B"


HALVES = 2  # split halves a and b, each with its own moments


def moment_layer_bytes(heads: int, dims: list[int]) -> int:
    """Bytes one layer's streamed row moments hold while a job runs (eigenattn.spectra.streamed):
    per head, view (with d keys) and half, the float64 shift and sum of the shifted rows (2d) and
    their d × d product sum: 8 · H · 2 · Σ (d + 2) · d, whatever the number of sequences. The
    job's fixed work buffers besides them: :func:`moment_work_bytes`."""
    return 8 * heads * HALVES * sum((d + 2) * d for d in dims)


def moment_work_bytes(heads: int, views: list[tuple[int, int]], n: int, products: str = "float64") -> int:
    """Bytes a stream_moments job holds besides its layers' moments, whatever its layers: per view
    ((queries, keys) = (q, d)) and half, the shifted rows of one sequence (H · q · d, float64, or
    float32 with float32 products, which add one d × d float32 product); and one sequence's
    (H, n, n) float32 score buffer of the capture."""
    item = 8 if products == "float64" else 4
    rows = sum(HALVES * heads * q * d * item + (HALVES * 4 * d * d if products == "float32" else 0) for q, d in views)
    return rows + 4 * heads * n * n


def moment_merge_bytes(layers: int, heads: int, dims: list[int], variants: int) -> int:
    """Bytes the merge of a streamed model's moments holds (``eigen_rows`` in streamed mode,
    :func:`eigenattn.spectra.streamed.merge_moment_files`), per view: the merged packed moments of
    every layer, for each variant and half, plus one stored part being read (at most every layer);
    the eigendecomposition that follows adds its own work arrays."""
    return 8 * heads * sum((d + 2) * d for d in dims) * layers * (HALVES * variants + 1)


def moment_store_bytes(layers: int, heads: int, dims: list[int]) -> int:
    """Bytes one streamed-moments store takes on disk (a ``stream_moments`` job's output): per
    layer, head, view (with d keys) and half, the float64 packed (d + 2) × d, stored uncompressed,
    plus the metadata; whatever the number of sequences."""
    return 8 * layers * heads * HALVES * sum((d + 2) * d for d in dims) + METADATA


def check_group_memory(model: str, per_layer: int, group: int, kept: int, stream_memory_gb: float) -> None:
    """Refuse a layer group whose moments (``group`` layers of ``per_layer`` bytes) exceed
    ``extraction.stream_memory_gb``, with the fix: a larger budget when one layer alone exceeds
    it, else as many layer groups as the budget needs (of ``kept`` layers)."""
    budget = float(stream_memory_gb) * 1e9
    if group * per_layer <= budget:
        return
    if per_layer > budget:
        raise ConfigError(
            "extraction.stream_memory_gb",
            f"one layer of {model}'s streamed row moments takes {human(per_layer)}, over the "
            f"{stream_memory_gb} GB a job's moments may take",
            f"raise extraction.stream_memory_gb to at least {math.ceil(per_layer / 1e9)} (if the machine "
            "has it), or analyse fewer eigen.views or a shorter sampling.seq_len (a view's moments grow as "
            "its square)",
        )
    per_job = int(budget // per_layer)
    raise ConfigError(
        "extraction.layer_groups",
        f"a job of {model} holds {group} layers' streamed row moments, {human(group * per_layer)}, over the "
        f"{stream_memory_gb} GB of extraction.stream_memory_gb ({per_job} layers fit)",
        f"use at least {math.ceil(kept / per_job)} layer groups (extraction.layer_groups), or auto with "
        f"models.{model}.n_layers and heads declared, so that the plan sizes the groups",
    )
