"""Streamed statistics (docs/method.md §14) against the model's plain forward pass, side by side.

    python benchmarks/streamed.py [--model-dir resources/models/smollm2] [--seq-lens 512 1024 2048]
                                  [--sequences 2] [--threads 2] [--rounds 2] [--device cpu|cuda]
                                  [--products float64|float32]
    python benchmarks/streamed.py --smoke     # one tiny round (seconds): does it still run?

For each length n, over the same real-text tokens and with every layer analysed:
(a) the model's plain forward pass (SDPA attention), the floor;
(b) the streamed statistics of `stream_moments`: the capture backend hands each layer's scores to
    the float64 row moments of every view (raw moments; row-centred ones follow exactly from them)
    and split half, merged by Chan's update.
Prints seconds per sequence of each, the ratio b/a (goal: at most 2 at n = 2,048), and where b's
time goes: the moments (the shift into the update's buffer and the symmetric rank-|Q| update of
every head, timed inside), and the capture (the rest: the forward pass with the analysed layers'
score blocks). The moments must do |Q|·d(d + 1)/2 multiply-adds per head and sequence (a triangle
of XᵀX; n³/16 in a causal model's `prefix` view); their rate on that work is printed beside the
rate of a bare syrk (float32 products: ssyrk; CUDA: a batched GEMM) of the same shapes, timed in
the same run, and the share of it they reach (goal: at least 0.8). a and b alternate in each
round, in one process; the best round of each is reported. Peak RSS is the whole process's.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

# torch, transformers and the library are imported where they are used, so that --help answers at once.
SMOKE = "--seq-lens 64 --sequences 2 --rounds 1 --threads 1 --layers 0 1".split()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="resources/models/smollm2")
    ap.add_argument("--documents", default="resources/corpora/enwiki-sample/documents.parquet")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--sequences", type=int, default=2, help="sequences per round (one forward pass each)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers analysed (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the model, the scores and the moments)")
    ap.add_argument("--products", default="float64", choices=["float64", "float32"], help="the moments' products")
    ap.add_argument("--smoke", action="store_true", help="one tiny round: " + " ".join(SMOKE))
    a = ap.parse_args(argv)
    if a.smoke:
        a = ap.parse_args([*SMOKE, "--model-dir", a.model_dir, "--documents", a.documents])

    import numpy as np
    import pandas as pd
    import torch
    from threadpoolctl import threadpool_limits
    from transformers import AutoModel

    from eigenattn.capture.interface import StopForward, capturing
    from eigenattn.capture.probe import equivalence_probe, load_capture_model
    from eigenattn.config.views import allowed_views, view_slices
    from eigenattn.spectra import streamed

    torch.set_num_threads(a.threads)
    threadpool_limits(a.threads, user_api="blas")  # the moments' syrk, as the stream_moments job
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok, capture_model = load_capture_model(a.model_dir, a.model_dir, dev)
    plain = AutoModel.from_pretrained(a.model_dir, attn_implementation="sdpa", dtype=torch.float32).eval().to(dev)
    text = " ".join(pd.read_parquet(a.documents)["text"].tolist())
    flat = tok(text[: 40 * max(a.seq_lens) * a.sequences], add_special_tokens=False)["input_ids"]
    probe = equivalence_probe(capture_model, torch.tensor([flat[:64]], dtype=torch.long, device=dev), a.model_dir)
    n_layers = probe.n_layers
    layers = list(range(n_layers)) if a.layers is None else a.layers
    causal = probe.causal(layers)
    views = allowed_views(causal)
    heads = capture_model.config.num_attention_heads

    spent = {"moments": 0.0}
    add = streamed._Moments.add

    def timed_add(self, i, X):
        sync()
        t = time.perf_counter()
        add(self, i, X)
        sync()
        spent["moments"] += time.perf_counter() - t

    def bare_rate(slices, n) -> float:
        """GMAC/s of a bare symmetric product of the moments' shapes (one layer, every head and
        view, one sequence) on the work the moments must do: BLAS syrk per head on CPU (dsyrk, or
        ssyrk for float32 products), a batched GEMM on CUDA; nothing around it."""
        from scipy.linalg import blas

        dtype = torch.float64 if a.products == "float64" else torch.float32
        A = [
            torch.randn(heads, len(range(n)[qs]), ks.stop - ks.start, device=dev, dtype=dtype)
            for qs, ks in slices.values()
        ]
        C = [torch.zeros(heads, x.shape[2], x.shape[2], device=dev, dtype=dtype) for x in A]
        syrk = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
        macs = sum(x.shape[0] * x.shape[1] * x.shape[2] * (x.shape[2] + 1) / 2 for x in A)
        best = float("inf")
        for _ in range(3):
            sync()
            t = time.perf_counter()
            for x, c in zip(A, C):
                if dev.type == "cpu":
                    for h in range(heads):
                        syrk(1.0, x[h].numpy().T, beta=1.0, c=c[h].numpy().T, trans=0, lower=0, overwrite_c=1)
                else:
                    c.baddbmm_(x.transpose(1, 2), x)
            sync()
            best = min(best, time.perf_counter() - t)
        return macs / best / 1e9

    streamed._Moments.add = timed_add
    print(
        f"model {a.model_dir}: {n_layers} layers x {heads} heads, {len(layers)} analysed, views {views}, "
        f"{a.threads} threads, {a.sequences} sequences per round, device {dev.type}, {a.products} products"
    )
    print(
        "    n | a: forward s/seq | b: streamed s/seq | b/a  | b: capture | b: moments | moments GMAC/s "
        "| bare syrk GMAC/s | share | peak RSS"
    )
    for n in a.seq_lens:
        if len(flat) < n * a.sequences:
            sys.exit(f"the documents hold {len(flat)} tokens, fewer than {n * a.sequences}")
        ids = torch.tensor(np.asarray(flat[: n * a.sequences]).reshape(a.sequences, n), dtype=torch.long, device=dev)
        slices = {v: view_slices(v, n, causal) for v in views}
        best_a, best_b, best_m = float("inf"), float("inf"), 0.0
        for _ in range(a.rounds):
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                for s in range(a.sequences):
                    plain(input_ids=ids[s : s + 1], attention_mask=torch.ones_like(ids[s : s + 1]))
            sync()
            best_a = min(best_a, (time.perf_counter() - t) / a.sequences)
            cap = streamed.MomentCapture(layers, heads, slices, a.sequences // 2, dev, products=a.products)
            spent["moments"] = 0.0
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                for s in range(a.sequences):
                    cap.begin(s)
                    try:
                        with capturing(cap):
                            capture_model(input_ids=ids[s : s + 1], attention_mask=torch.ones_like(ids[s : s + 1]))
                    except StopForward:
                        pass
                cap.packed()
            sync()
            tb = (time.perf_counter() - t) / a.sequences
            if tb < best_b:
                best_b, best_m = tb, spent["moments"] / a.sequences
        d = {v: ks.stop - ks.start for v, (qs, ks) in slices.items()}
        macs = sum(len(range(n)[qs]) * d[v] * (d[v] + 1) / 2 for v, (qs, ks) in slices.items()) * heads * len(layers)
        rate, bare = macs / max(best_m, 1e-9) / 1e9, bare_rate(slices, n)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(
            f"{n:5d} | {best_a:16.3f} | {best_b:17.3f} | {best_b / best_a:4.2f} | {best_b - best_m:10.3f} | "
            f"{best_m:10.3f} | {rate:14.1f} | {bare:16.1f} | {rate / bare:5.2f} | {rss:.2f} GB"
        )
    streamed._Moments.add = add


if __name__ == "__main__":
    main()
