"""Time one attention layer on CPU: exact eager, exact SDPA and `partial` attention.

    python benchmarks/partial_attention.py [--threads 2] [--heads 4] [--rounds 5]
    python benchmarks/partial_attention.py --smoke    # one small size, one round (seconds)

For n in {512, 1024, 2048}, d_head = 64 and s in {16, 32, 64}, over the whole matrix (view
`all`). Each configuration is timed in interleaved rounds (eager, SDPA, partial, ...) and the
median is reported, so the ratios are measured side by side. Next to each measured ratio the
FLOP count predicts, in multiply-adds per head:

    exact   scores n·n·d_head          + P·V n·n·d_head
    partial scores n·s·d_head + n·s·n  + P·V n·n·d_head

Two ratios are printed: the scores alone (the part partial computation replaces) and the whole
layer (scores, softmax and P·V).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from eigenattn.reconstruction.partial import PartialMap, partial_scores  # noqa: E402

SMOKE = "--sizes 128 --subsets 16 --rounds 1 --threads 1".split()


def eager_scores(q, k, scale):
    return torch.matmul(q, k.transpose(-1, -2)) * scale


def eager_layer(q, k, v, scale):
    return torch.matmul(torch.softmax(eager_scores(q, k, scale), dim=-1), v)


def sdpa_layer(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def partial_layer(q, k, v, pm, scale):
    return torch.matmul(torch.softmax(partial_scores(q, k, pm, scale), dim=-1), v)


def timed(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--subsets", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--smoke", action="store_true", help=f"a smoke run: {' '.join(SMOKE)} (overrides those options)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings come last, so they win over the same options given before
        args = ap.parse_args([*(sys.argv[1:] if argv is None else argv), *SMOKE])
    torch.set_num_threads(args.threads)
    dh, H = 64, args.heads
    scale = dh**-0.5
    print(
        f"one attention layer, batch 1, {H} heads, d_head {dh}, float32, {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds"
    )
    head = (
        f"{'n':>5} {'s':>3} | {'eager ms':>9} {'sdpa ms':>8} {'partial ms':>10} | "
        f"{'scores p/e':>10} {'FLOP':>6} | {'layer p/e':>9} {'FLOP':>6} | {'layer p/sdpa':>12}"
    )
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for n in args.sizes:
            q, k, v = (torch.randn(1, H, n, dh) for _ in range(3))
            reps = max(1, int(2048 / n) ** 2)
            for s in args.subsets:
                T = np.stack([np.sort(rng.choice(n, s, replace=False)) for _ in range(H)])
                pm = PartialMap(
                    T,
                    0.1 * rng.standard_normal((H, n, s)),
                    rng.standard_normal((H, n)),
                    seq_len=n,
                    query_range=(0, n),
                    key_range=(0, n),
                )
                fns = {
                    "eager": lambda: eager_layer(q, k, v, scale),
                    "sdpa": lambda: sdpa_layer(q, k, v, scale),
                    "partial": lambda: partial_layer(q, k, v, pm, scale),
                    "eager_scores": lambda: eager_scores(q, k, scale),
                    "partial_scores": lambda: partial_scores(q, k, pm, scale),
                }
                for f in fns.values():  # warm-up
                    f()
                times = {name: [] for name in fns}
                for _ in range(args.rounds):
                    for name, f in fns.items():
                        times[name].append(timed(f, reps))
                t = {name: statistics.median(x) for name, x in times.items()}
                flop_scores = (s * dh + s * n) / (n * dh)
                flop_layer = (n * s * dh + n * s * n + n * n * dh) / (2 * n * n * dh)
                print(
                    f"{n:>5} {s:>3} | {t['eager'] * 1e3:>9.2f} {t['sdpa'] * 1e3:>8.2f} {t['partial'] * 1e3:>10.2f} | "
                    f"{t['partial_scores'] / t['eager_scores']:>10.2f} {flop_scores:>6.2f} | "
                    f"{t['partial'] / t['eager']:>9.2f} {flop_layer:>6.2f} | {t['partial'] / t['sdpa']:>12.2f}"
                )


if __name__ == "__main__":
    main()
