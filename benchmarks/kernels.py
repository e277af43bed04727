"""The latency table (docs/method.md, "Cost by the clock"): every method's real kernel against SDPA, with its three
cost shares side by side in one run.

    python benchmarks/kernels.py                         # n 2048 4096 8192, s 64 256 1024, 9 heads, d_head 64, 1 thread
    python benchmarks/kernels.py --threads 2 --device cuda --out table.csv
    python benchmarks/kernels.py --smoke                 # tiny sizes, every step once (seconds)

For each n: random normal Q, K, V (1, heads, n, d_head) float32, SDPA causal timed once, then each
method at each s on the same tensors (eigenattn.reconstruction.clock):

- flex_causal: exact causal attention through compiled FlexAttention (the block kernel's overhead);
- sink_window, vertical_slash: whole causal scope (every query);
- nystrom (m = s), paper (dense map W, d×s), subset_only: the prefix view (queries n/2..n−1 against
  keys 0..n/2−1), the rest exact.

Shares are of exact causal attention: macs (§11's count), blocks (key blocks of 128 touched) and
time (median of warm repeats over SDPA's median). compile is the first call's extra time plus any
input-independent setup (a block mask), apart from the time. vertical_slash's index (pattern and
per-row keys, input-dependent, inside its time) is also timed alone. A row is flagged (!) where the MAC share
and the time share differ by more than 2x either way.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from eigenattn.config.schema import node  # noqa: E402
from eigenattn.reconstruction import clock  # noqa: E402

SMOKE = "--sizes 256 300 --subsets 16 64 --heads 2 --d-head 16 --repeats 1 --threads 1".split()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--subsets", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--methods", nargs="+", default=list(clock.METHODS), choices=clock.METHODS)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--d-head", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="warm repeats; the median is reported")
    ap.add_argument("--eager", action="store_true", help="eager FlexAttention (no torch.compile)")
    ap.add_argument("--sinks", type=int, default=node("reconstruction.peer_sinks")["default"])
    ap.add_argument("--q-last", type=int, default=node("reconstruction.peer_q_last")["default"])
    ap.add_argument("--pinv", default=node("reconstruction.nystrom_pinv")["default"][0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--inputs",
        default="random",
        choices=["random", "local"],
        help="random normal Q, K, V, or with a position code on Q and K (heads that attend near their diagonal)",
    )
    ap.add_argument("--out", type=Path, help="also write the table as CSV here")
    ap.add_argument("--smoke", action="store_true", help=f"a smoke run: {' '.join(SMOKE)} (overrides those options)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke settings come last, so they win over the same options given before
        args = ap.parse_args([*(sys.argv[1:] if argv is None else argv), *SMOKE])
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    print(
        f"latency table: {args.heads} heads, d_head {args.d_head}, float32, batch 1, {args.threads} thread(s), "
        f"{args.device}, {'eager' if args.eager else 'compiled'} FlexAttention, median of {args.repeats} warm repeats; "
        f"sinks {args.sinks}, q_last {args.q_last}, nystrom pinv {args.pinv}, {args.inputs} Q and K"
    )
    head = (
        f"{'n':>5} {'method':<15} {'s':>5} | {'macs':>6} {'blocks':>6} {'time':>6} | "
        f"{'time s':>8} {'sdpa s':>8} {'compile s':>9} | flag"
    )
    print(head)
    print("-" * len(head), flush=True)

    def log(r):
        ratio = r["time_share"] / r["macs_share"]
        flag = "!" if ratio > 2 or ratio < 0.5 else ""
        index = f" (index {r['index_s']:.4f} s)" if r["method"] == "vertical_slash" else ""
        print(
            f"{r['n']:>5} {r['method']:<15} {r['s']:>5} | {r['macs_share']:>6.3f} {r['blocks_share']:>6.3f} "
            f"{r['time_share']:>6.3f} | {r['time_s']:>8.4f} {r['sdpa_s']:>8.4f} {r['compile_s']:>9.2f} | "
            f"{flag}{f' time/macs {ratio:.1f}x' if flag else ''}"
            f"{index}",
            flush=True,
        )

    table = clock.latency_table(
        args.sizes,
        args.subsets,
        args.methods,
        d_head=args.d_head,
        heads=args.heads,
        threads=args.threads,
        device=args.device,
        repeats=args.repeats,
        compiled=not args.eager,
        sinks=args.sinks,
        q_last=args.q_last,
        pinv=args.pinv,
        seed=args.seed,
        inputs=args.inputs,
        log=log,
    )
    if len(table):
        print(f"device: {table['device'].iloc[0]}, torch {table['torch_version'].iloc[0]}")
    if args.out is not None:
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    bad = clock.disagreements(table)
    names = sorted({f"{m} (s={s})" for m, s in zip(bad["method"], bad["s"])})
    print(f"MACs vs clock: {len(bad)} of {len(table)} rows disagree by more than 2x: {', '.join(names) or 'none'}")


if __name__ == "__main__":
    main()
