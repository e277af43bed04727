"""Extraction throughput: this pipeline against the SDPA forward floor and the naive approach.

    python benchmarks/extraction.py [--model-dir resources/models/minilm] [--threads 2] [--dtype auto]
    python benchmarks/extraction.py --smoke     # one tiny round (seconds): does it still run?

(a) forward pass alone, SDPA attention (the floor);
(b) naive: eager attention, output_attentions=True, post-softmax probabilities to numpy, np.save;
(c) this pipeline's extraction (capture attention + Zarr writes, checksums included), in the dtype
    the pipeline stores: with --dtype auto (the default, as extraction.dtype), float16 where the
    equivalence probe accepts it and float32 where not (minilm at n = 256), as the table's dtype says;
(d) the machine's write floor: the same bytes written as plain files, one per batch, no model.
Prints sequences/second, the ratios c/a and c/b, c against the serial floor 1/(1/a + 1/d) (the
forward pass plus writing its bytes, if nothing overlapped), bytes per sequence and the
compression ratio. Targets: c/a >= 0.85 and c >= b. All four run side by side in one process,
interleaved.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# torch, transformers and the library are imported where they are used, so that --help answers at once.
# One round of 2 sequences at n = 256, where minilm's float16 scores fail the probe: the smallest run
# that loads the model, probes it, resolves the dtype and writes a store.
SMOKE = "--seq-lens 256 --tokens 512 --batch-size 2 --chunk-sequences 2 --rounds 1 --threads 1".split()


def _batches(ids, bs):
    import torch

    for i in range(0, len(ids), bs):
        yield torch.from_numpy(ids[i : i + bs].astype(np.int64))


def time_sdpa(model_dir, ids, bs):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for b in _batches(ids, bs):
            model(input_ids=b, attention_mask=torch.ones_like(b))
    return len(ids) / (time.perf_counter() - t)


def time_naive(model_dir, ids, bs, out_dir):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for i, b in enumerate(_batches(ids, bs)):
            out = model(input_ids=b, attention_mask=torch.ones_like(b), output_attentions=True)
            probs = np.stack([a.numpy() for a in out.attentions], axis=1)
            np.save(out_dir / f"batch-{i}.npy", probs)
    return len(ids) / (time.perf_counter() - t)


def time_write(shape, dtype, N, bs, out_dir) -> float:
    """Sequences/second of writing N sequences of ``dtype`` scores of ``shape`` (L, H, n, n) as
    plain files, one per batch of ``bs`` (fresh files, as extraction writes them)."""
    block = np.random.default_rng(0).standard_normal((bs, *shape)).astype(dtype)
    t = time.perf_counter()
    for i in range(0, N, bs):
        block[: min(bs, N - i)].tofile(out_dir / f"batch-{i}.bin")
    return N / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="resources/models/minilm")
    ap.add_argument("--documents", default="resources/corpora/enwiki-sample/documents.parquet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-sequences", type=int, default=8, help="sequences per stored chunk (divides --batch-size)")
    ap.add_argument("--compression", default="none", choices=["none", "lz4", "zstd"])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per measurement (sets N = tokens/n)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "float32"],
        help="storage dtype, as extraction.dtype: auto lets the equivalence probe choose (an explicit "
        "float16 is refused where the probe finds it inexact)",
    )
    ap.add_argument("--smoke", action="store_true", help=f"a smoke run: {' '.join(SMOKE)} (overrides those options)")
    a = ap.parse_args(argv)
    if a.smoke:  # the smoke settings come last, so they win over the same options given before
        a = ap.parse_args([*(sys.argv[1:] if argv is None else argv), *SMOKE])
    import pandas as pd
    import torch
    import zarr
    from transformers import AutoTokenizer

    from eigenattn.capture.extract import dir_size, extract_scores
    from eigenattn.config.settings import Sampling
    from eigenattn.corpus.passages import sample_passages, tokenize_passages

    torch.set_num_threads(a.threads)
    docs = pd.read_parquet(a.documents)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rows = []
    for n in a.seq_lens:
        N = max(a.tokens // n, a.batch_size)
        passages = sample_passages(docs, Sampling("bench", 0, n, {"fit": N, "heldout": 1}, 0.2, "sampling"))
        texts = passages.loc[passages.split == "fit", "text"].tolist()
        ids = tokenize_passages(tok, texts, n)
        tmp = Path(tempfile.mkdtemp(prefix="eigenattn-bench-"))
        sa, sb, sc, sd = [], [], [], []
        try:
            time_sdpa(a.model_dir, ids[: a.batch_size], a.batch_size)  # warm-up
            for r in range(a.rounds):  # interleaved, so machine noise hits all four alike
                sa.append(time_sdpa(a.model_dir, ids, a.batch_size))
                naive_dir = tmp / f"naive-{r}"
                naive_dir.mkdir()
                sb.append(time_naive(a.model_dir, ids, a.batch_size, naive_dir))
                naive_bytes = dir_size(naive_dir)
                shutil.rmtree(naive_dir)
                st = extract_scores(
                    a.model_dir,
                    texts,
                    np.arange(N),
                    tmp / f"s-{r}.zarr",
                    seq_len=n,
                    dtype=a.dtype,
                    batch_size=a.batch_size,
                    chunk_sequences=a.chunk_sequences,
                    device=a.device,
                    progress=False,
                    autocast="none",
                    layers="all",
                    compression=a.compression,
                )
                sc.append(N / st["loop_seconds"])
                stored = zarr.open_group(tmp / f"s-{r}.zarr", mode="r")["scores"]
                shape, dtype = stored.shape[1:], stored.dtype
                shutil.rmtree(tmp / f"s-{r}.zarr")
                write_dir = tmp / f"write-{r}"
                write_dir.mkdir()
                sd.append(time_write(shape, dtype, N, a.batch_size, write_dir))
                shutil.rmtree(write_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sa, sb, sc, sd = (float(np.median(x)) for x in (sa, sb, sc, sd))
        rows.append(
            {
                "n": n,
                "N": N,
                "dtype": str(dtype),
                "a_sdpa_seq_s": sa,
                "b_naive_seq_s": sb,
                "c_pipeline_seq_s": sc,
                "d_write_seq_s": sd,
                "c/a": sc / sa,
                "c/b": sc / sb,
                "c/serial_floor": sc * (1 / sa + 1 / sd),
                "bytes_per_seq": st["bytes_stored"] / N,
                "naive_bytes_per_seq": naive_bytes / N,
                "compression_ratio": st["bytes_raw"] / st["bytes_stored"],
            }
        )
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"model {a.model_dir}, {a.threads} threads, batch {a.batch_size}, device {a.device}")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    for r in rows:
        ok = "OK" if r["c/a"] >= 0.85 and r["c/b"] >= 1 else "MISSED"
        print(
            f"n={r['n']}: c/a = {r['c/a']:.2f} (target >= 0.85), c/b = {r['c/b']:.2f} (target >= 1): {ok}; "
            f"against the serial floor (forward + plain writes) {r['c/serial_floor']:.2f}"
        )
    return df


if __name__ == "__main__":
    main()
