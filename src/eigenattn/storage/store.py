"""Zarr layout helpers shared by the stages: the one store writer (:func:`new_store`) and opener
(:func:`open_store`), codecs, chunking and reading shards as Dask arrays."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from eigenattn import __version__
from eigenattn.errors import InputError

CODECS = {
    # Measured on float16 minilm scores (one core): lz4 ratio 1.03, ~1 GB/s encode, ~2 GB/s decode;
    # zstd ratio 1.11, ~0.4 GB/s encode, ~0.5 GB/s decode. Scores are nearly incompressible, and
    # extraction and the eigen stage are CPU-bound, so lz4 is the default for them.
    "lz4": {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"},
    "zstd": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"},
}


# Analysis stores (spectra, overlaps) are small and written once: the smaller codec.
ANALYSIS_CODEC = "zstd"


def compressor(dtype: str, codec: str):
    """A Blosc codec (see CODECS) with the element size as its typesize."""
    return BloscCodec(**CODECS[codec], typesize=np.dtype(dtype).itemsize)


def score_codecs(dtype: str, codec: str) -> list:
    """Codecs of a score store: the compressor (none for ``none``), then a CRC32C checksum, so a
    chunk that rots on disk fails its read instead of yielding wrong scores."""
    return ([] if codec == "none" else [compressor(dtype, codec)]) + [Crc32cCodec()]


def score_chunks(batch: int, heads: int, n: int) -> tuple[int, ...]:
    """One chunk = a batch of sequences for one layer, all heads: (B, 1, H, n, n)."""
    return (batch, 1, heads, n, n)


SCORE_DIMS = ["sequence", "layer", "head", "query", "key"]


def create_score_store(
    root,
    *,
    ids,
    passage_ids,
    layers,
    heads: int,
    kv_heads: int,
    seq_len: int,
    dtype: str,
    compression: str,
    chunk_sequences: int,
    shard_sequences: int,
):
    """The arrays of a score store (docs/data-contract.md), with named dimensions and coordinates,
    so that ``xarray.open_zarr`` gives a labelled dataset.

    ``scores`` is sharded: one shard file per block of ``shard_sequences`` sequences (the block the
    extraction writes at once) holds every layer, in inner chunks of ``chunk_sequences`` sequences ×
    one layer × all heads, the unit the eigen stage reads.
    """
    n_seq, L = len(ids), len(layers)
    scores = root.create_array(
        "scores",
        shape=(n_seq, L, heads, seq_len, seq_len),
        dtype=dtype,
        chunks=score_chunks(chunk_sequences, heads, seq_len),
        shards=(shard_sequences, L, heads, seq_len, seq_len),
        compressors=score_codecs(dtype, compression),
        fill_value=np.nan,
        dimension_names=SCORE_DIMS,
        config={"write_empty_chunks": True},
    )
    scores.attrs["coordinates"] = "passage_id kv_head"
    whole = (max(n_seq, 1), seq_len)
    root.create_array("input_ids", data=ids, chunks=whole, dimension_names=["sequence", "position"])
    root.create_array(
        "attention_mask", data=np.ones_like(ids, dtype=np.int8), chunks=whole, dimension_names=["sequence", "position"]
    )
    coords = {
        "passage_id": (np.asarray(passage_ids, dtype=np.int64), "sequence"),
        "layer": (np.asarray(layers, dtype=np.int64), "layer"),
        "head": (np.arange(heads, dtype=np.int64), "head"),
        "kv_head": (np.arange(heads, dtype=np.int64) // max(heads // kv_heads, 1), "head"),
        "query": (np.arange(seq_len, dtype=np.int64), "query"),
        "key": (np.arange(seq_len, dtype=np.int64), "key"),
        "position": (np.arange(seq_len, dtype=np.int64), "position"),
    }
    for name, (values, dim) in coords.items():
        root.create_array(name, data=values, dimension_names=[dim])
    return scores


def refetch_hint(path) -> str:
    return f"re-create it: snakemake --cores all --forcerun {path} (then run your target again)"


_EXPONENT = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}


def all_finite(x: np.ndarray) -> bool:
    """Whether every element is finite. For IEEE floats it tests the exponent bits (all ones means
    inf or NaN) as integers, about 10x faster than np.isfinite on float16."""
    x = np.asarray(x)
    if x.dtype not in _EXPONENT or not x.flags.c_contiguous:
        return bool(np.isfinite(x).all())
    utype, mask = _EXPONENT[x.dtype]
    return int(np.max(x.view(utype) & utype(mask), initial=0)) != mask


class CheckedScores:
    """The ``scores`` array of one store, read chunk by chunk for Dask. A chunk that cannot be read
    (missing, truncated, failing its checksum) or that holds a non-finite score stops the stage
    with an error naming the store, the chunk and the fix, so no NaN reaches a result."""

    def __init__(self, path, arr):
        self.path, self.arr = str(path), arr
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def _where(self, key) -> str:
        spans = [f"{k.start}:{k.stop}" if isinstance(k, slice) else str(k) for k in key]
        return f"scores[{', '.join(spans)}]"

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        try:
            x = self.arr[key]
        except Exception as e:  # noqa: BLE001 - codec and checksum errors have many types
            raise InputError(
                self.path,
                f"{self._where(key)} cannot be read ({type(e).__name__}: {e}); the store is damaged",
                refetch_hint(self.path),
            ) from e
        if not all_finite(x):
            raise InputError(
                self.path,
                f"{self._where(key)} holds {int((~np.isfinite(x)).sum())} non-finite "
                "scores (a missing or damaged chunk reads as NaN)",
                refetch_hint(self.path),
            )
        return x


def missing_objects(path, arr) -> list[tuple[int, ...]]:
    """Grid keys of the stored objects (chunks, or shards) of a local array that are absent."""
    step = arr.shards or arr.chunks
    grid = [-(-s // c) for s, c in zip(arr.shape, step)]
    root = Path(path) / "c"
    present = {
        tuple(int(x) for x in Path(d, f).relative_to(root).parts) for d, _, files in os.walk(root) for f in files
    }
    return [k for k in np.ndindex(*grid) if k not in present]


# keys of a score store's expectations that a token store (streamed mode: float32 scores recomputed
# from the model, never stored) does not answer
STORED_ONLY = ("dtype", "dtype_requested")


def _checked_arrays(shards: list[str | Path], expect: dict | None, recompute=None):
    """The checked ``scores`` arrays of the shard stores (see :func:`open_scores`), and the first's attrs.

    A token store (attrs ``route: recompute``, streamed mode) has no scores: ``recompute(path,
    attrs)`` gives an array-like that computes them from the model
    (:func:`eigenattn.capture.recompute.open_token_shard`); a caller that passes none reads stored
    scores only."""
    if not shards:
        raise InputError(str(list(shards)), "no score shards given", "pass the shard stores the extraction stage wrote")
    arrays, attrs = [], None
    for p in shards:
        g = open_store(p)
        a = g.attrs.asdict()
        token_store = a.get("route") == "recompute"
        if token_store and recompute is None:
            raise InputError(
                p,
                "is a token store of streamed mode (extraction.store: stream): its scores are not stored, "
                "and this stage reads stored scores only",
                "use extraction.store: scores for this model",
            )
        for key, want in (expect or {}).items():
            if token_store and key in STORED_ONLY:
                continue
            if a.get(key) != want:
                raise InputError(
                    p,
                    f"written with {key} = {a.get(key)!r}, but this stage expects {want!r}: the store is stale",
                    refetch_hint(p),
                )
        if attrs is None:
            attrs = a
        elif (a["layers"], a["heads"], a["seq_len"], a.get("autocast"), a.get("autocast_requested")) != (
            attrs["layers"],
            attrs["heads"],
            attrs["seq_len"],
            attrs.get("autocast"),
            attrs.get("autocast_requested"),
        ):
            raise InputError(
                p,
                f"layers/heads/seq_len/autocast differ from {shards[0]}",
                "pass shards of one extraction (same model, layers, seq_len and autocast), or re-run it",
            )
        if token_store:
            arrays.append(recompute(p, a))
            continue
        arr = g["scores"]
        missing = missing_objects(Path(p) / "scores", arr)
        if missing:
            raise InputError(
                p, f"{len(missing)} chunk file(s) of scores are missing (first: {missing[0]})", refetch_hint(p)
            )
        arrays.append(CheckedScores(p, arr))
    return arrays, attrs


def open_scores(shards: list[str | Path], expect: dict | None = None, recompute=None):
    """Concatenate the ``scores`` arrays of several shard stores into one checked Dask array.

    Each store must be marked complete, hold every chunk, and carry the attributes in ``expect``
    (e.g. the model, split, seq_len, dtype and seed the calling rule was configured with); a stale
    or damaged store fails here, naming it and the fix. Dask chunks equal the Zarr chunks, and every
    chunk is checked as it is read (:class:`CheckedScores`). Returns (dask array, attrs of the
    first shard). ``recompute``: how to read a token store (see :func:`_checked_arrays`).
    """
    arrays, attrs = _checked_arrays(shards, expect, recompute)
    return _as_dask(arrays), attrs


def _as_dask(arrays):
    import dask.array as da  # here, not at module level: ~0.8 s (it brings pandas and xarray) that jobs
    # without Dask (fetching, sampling, tables) need not pay

    return da.concatenate(
        [
            da.from_array(
                c,
                chunks=c.arr.chunks,
                asarray=False,
                name=f"scores-{Path(c.path).resolve()}",
                meta=np.empty((0,) * c.ndim, c.dtype),
            )
            for c in arrays
        ],
        axis=0,
    )


@contextlib.contextmanager
def atomic_output(path: str | Path, directory: bool = False):
    """Yield a temporary sibling of ``path`` (a new directory, or a file name); on success it is
    renamed to ``path``, replacing what was there. On any error it is removed, so an interrupted
    writer never leaves an output at ``path`` that looks complete. The one atomic writer of the
    package: stores, tables, checkpoints and model folders all go through it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed outright (SIGKILL, out of memory) leaves its temporary sibling behind; the
    # next writer of the same output sweeps it (one job writes an output at a time).
    for stale in path.parent.glob(f".{glob_escape(path.name)}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp.chmod(0o755)
    if not directory:
        tmp = tmp / path.name  # a file inside a private folder: any suffix-sensitive writer works
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp if directory else tmp.parent, ignore_errors=True)


def atomic_store(path: str | Path):
    """:func:`atomic_output` for a directory (a model folder, a tokenizer); a Zarr store goes through
    :func:`new_store`, which adds its version, ``complete`` marker and consolidated metadata."""
    return atomic_output(path, directory=True)


@contextlib.contextmanager
def new_store(path: str | Path):
    """The one writer of a Zarr v3 store: yield the empty root group of a temporary store next to
    ``path`` for the caller to fill (arrays, attrs); once the block ends without an error, add the
    ``eigenattn_version`` and the ``complete`` marker, consolidate the metadata (one read opens
    it, also on object stores) and move the store into place. On an error the temporary store is
    removed, so an interrupted writer never leaves a store that looks complete (a writer killed
    outright leaves its temporary sibling, swept by the next writer: :func:`atomic_output`).
    """
    with atomic_store(path) as tmp:
        root = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        yield root
        root.attrs.update({"eigenattn_version": __version__, "complete": True})
        with warnings.catch_warnings():  # zarr notes that consolidation is not in the v3 spec yet; xarray reads it
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(zarr.storage.LocalStore(tmp))


def open_store(path: str | Path):
    """The one opener of a Zarr v3 store: its root group, read-only (through its consolidated
    metadata where it has them), once it is checked to be a store marked complete by its writer
    (:func:`new_store`), whose ``eigenattn_version``, where present, names a version. Otherwise an
    :class:`InputError` names the store and the fix: re-run the rule that writes it."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise InputError(
            path, "not a Zarr v3 group (no zarr.json); was the stage that writes it run?", refetch_hint(path)
        )
    g = zarr.open_group(zarr.storage.LocalStore(path, read_only=True), mode="r")
    a = g.attrs
    if a.get("complete") is not True:
        raise InputError(path, "store is not marked complete", refetch_hint(path))
    if "eigenattn_version" in a and not (isinstance(a["eigenattn_version"], str) and a["eigenattn_version"]):
        raise InputError(
            path,
            f"eigenattn_version is {a['eigenattn_version']!r}, not a version: the store was not written by eigenattn",
            refetch_hint(path),
        )
    return g


def write_arrays(group, arrays: dict, dims: dict, attrs: dict | None = None, coords: dict | None = None):
    """Write a dict of numpy arrays (nested dicts become subgroups) into a Zarr group.

    ``dims`` names the dimensions of every array (nested like ``arrays``); ``coords`` maps a
    coordinate name to (values, dimension) and is written into every group that uses the dimension,
    so each group opens with ``xarray.open_zarr`` as a labelled dataset.
    """
    used = set()
    for name, value in arrays.items():
        if isinstance(value, dict):
            write_arrays(group.require_group(name), value, dims[name], coords=coords)
            continue
        value = np.asarray(value)
        if len(dims[name]) != value.ndim:
            raise ValueError(f"{name}: {value.ndim} dimensions but {len(dims[name])} names {dims[name]}")
        # whole arrays up to 16 MB; bigger ones chunk along their first (layer) axis
        chunks = value.shape if value.nbytes <= 16 << 20 else (1, *value.shape[1:])
        group.create_array(
            name,
            data=value,
            chunks=chunks,
            compressors=compressor(value.dtype.str, ANALYSIS_CODEC),
            dimension_names=dims[name],
        )
        used |= set(dims[name])
    for name, (values, dim) in (coords or {}).items():
        if dim in used and name not in group:
            group.create_array(name, data=np.asarray(values), dimension_names=[dim])
    if attrs:
        group.attrs.update(attrs)


def write_table(df, path: str | Path) -> None:
    """Write a DataFrame as .parquet or .csv (by suffix), atomically."""
    path = Path(path)
    if path.suffix not in (".parquet", ".csv"):
        raise ValueError(f"{path}: unsupported table format (use .parquet or .csv)")
    with atomic_output(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
