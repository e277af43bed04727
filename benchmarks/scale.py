"""Time and peak memory of the full-matrix eigen stage against N, D and the number of heads, on
synthetic float16 stores with real head counts, for both exact routes; and a paper-scale projection.

    python benchmarks/scale.py                     # the default grids (about 15 minutes on 2 cores)
    python benchmarks/scale.py --quick             # smaller grids (about 4 minutes)
    python benchmarks/scale.py --heads-only        # just the peak-RSS-against-heads check

Each measurement runs ``run_full`` (one variant, ``raw``) in its own process, so its peak RSS is its
own, with eigen.gram_memory_mb = --budget and 2 workers. Printed:

1. covariance route (D <= N): time and peak RSS against N at fixed D, and against D at fixed N;
2. Gram route (D > N): the same;
3. peak RSS at a fixed N and D for 2 x 4, 6 x 12 and 12 x 12 heads (it must not grow with L·H);
4. the fitted laws  time ~ L·H · c · N^a · D^b  per route, the planner's peak estimate against
   the measured peak, the read throughput, and the projection of a paper-scale run (n = 512,
   N = 10,000, 12 x 12 heads, both views) from these fits and the planner's read volume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, os, sys, time
from eigenattn.spectra.stores import run_full
from eigenattn.spectra.scheduler import dask_scheduler
store, out, view, budget, route = sys.argv[1:6]
t, c = time.perf_counter(), os.times()
with dask_scheduler("threads", 2):
    res = run_full([store], out + "/full.zarr", view, ["raw"], float(budget), rank=None, seed=0, workers=2,
                   route=route)
c1 = os.times()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": c1.user + c1.system - c.user - c.system,
                  "peak_mb": hwm / 1024, "route": res["raw"]["route"]}))
"""


def make_store(path: Path, N: int, L: int, H: int, n: int, batch: int = 8) -> int:
    """A float16 score store of low-rank-plus-noise blocks in the extraction stage's layout
    (eigenattn.storage.store.create_score_store: shards of ``batch`` sequences, default codecs), written
    batch by batch; returns its bytes."""
    from eigenattn.storage.store import create_score_store, new_store

    with new_store(path) as g:
        arr = create_score_store(
            g,
            ids=np.zeros((N, n), dtype=np.int32),
            passage_ids=np.arange(N),
            layers=range(L),
            heads=H,
            kv_heads=H,
            seq_len=n,
            dtype="float16",
            compression="none",
            chunk_sequences=batch,
            shard_sequences=batch,
        )
        rng = np.random.default_rng(0)
        basis = rng.standard_normal((L, H, 8, n), dtype=np.float32)
        for s in range(0, N, batch):
            b = min(batch, N - s)
            coef = rng.standard_normal((b, L, H, n, 8), dtype=np.float32)
            arr[s : s + b] = (
                np.einsum("blhqr,lhrk->blhqk", coef, basis) + rng.standard_normal((b, L, H, n, n), dtype=np.float32)
            ).astype(np.float16)
        g.attrs.update(
            {
                "model": "synthetic",
                "layers": list(range(L)),
                "heads": H,
                "seq_len": n,
                "causal": False,
                "dtype": "float16",
            }
        )
    return N * L * H * n * n * 2


REPLAY: dict = {}  # (N, L, H, n, view) -> a measurement printed by an earlier run (--replay)
GEMM = 70.0  # float64 GFLOP/s of one core, measured in main()
REPLAY_GBPS = 0.14  # with --replay: the read throughput measured on this machine (benchmarks/scale.py)


def measure(tmp: Path, N: int, L: int, H: int, n: int, view: str, budget: float, route: str = "auto") -> dict:
    if REPLAY:
        return REPLAY[N, L, H, n, view]
    store = tmp / f"s-{N}-{L}x{H}-{n}.zarr"
    if not store.exists():
        make_store(store, N, L, H, n)
    with tempfile.TemporaryDirectory(dir=tmp) as out:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(store), out, view, str(budget), route], capture_output=True, text=True
        )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    D = (n // 2) ** 2 if view == "prefix" else n * n
    rec.update({"N": N, "L": L, "H": H, "n": n, "D": D, "view": view})
    from eigenattn.spectra.full_spectra import plan_full

    rec["plan_peak_mb"] = plan_full(N, D, L, H, N // 2, 8, budget, 2, route, rank=None).peak_mb()
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    return rec


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def fit_law(recs, route: str) -> tuple[float, float, float]:
    """Per-head time as the two costs the route pays, fitted by non-negative least squares:
    covariance  t = a·N·D² (streamed scatter) + b·D³ (eigenproblems) + c;
    gram        t = a·N²·D (streamed Gram) + b·N³ (eigenproblems) + c.  Returns (a, b, c)."""
    from scipy.optimize import nnls

    def terms(N, D):
        return [N * D * D, D**3, 1.0] if route == "covariance" else [N * N * D, N**3, 1.0]

    A = np.array([terms(float(r["N"]), float(r["D"])) for r in recs])
    y = np.array([r["seconds"] / (r["L"] * r["H"]) for r in recs])
    scale = A.max(axis=0)
    coef, _ = nnls(A / scale, y)
    return tuple(float(x) for x in coef / scale)


def law_seconds(law, route: str, N: float, D: float) -> float:
    a, b, c = law
    return a * N * D * D + b * D**3 + c if route == "covariance" else a * N * N * D + b * N**3 + c


def table(title: str, recs, key: str):
    print(f"\n{title}")
    print(f"{'N':>6} {'D':>6} {'heads':>7} {'time s':>8} {'cpu s':>7} {'peak MB':>8} {'plan MB':>8}")
    for r in recs:
        print(
            f"{r['N']:>6} {r['D']:>6} {r['L']}x{r['H']:<5} {r['seconds']:>8.1f} {r['cpu']:>7.1f} "
            f"{r['peak_mb']:>8.0f} {r['plan_peak_mb']:>8.0f}"
        )
    xs = [r["L"] * r["H"] if key == "L·H" else r[key] for r in recs]
    if len(set(xs)) > 1:
        print(
            f"growth against {key}: time ~ {key}^{slope(xs, [r['seconds'] for r in recs]):.2f}, "
            f"peak RSS ~ {key}^{slope(xs, [r['peak_mb'] for r in recs]):.2f}"
        )


def read_throughput(tmp: Path) -> float:
    """GB/s of float16 scores read through ScoreSource (one layer, all heads, 2,048 sequences)."""
    from eigenattn.storage.score_source import open_score_source

    store = tmp / "s-2048-2x12-32.zarr"
    if not store.exists():
        make_store(store, 2048, 2, 12, 32)
    src, _ = open_score_source([store])
    t = time.perf_counter()
    for layer in range(2):
        src.read(0, 2048, layer, slice(None))
    return 2 * 2048 * 12 * 32 * 32 * 2 / (time.perf_counter() - t) / 1e9


def eigen_floor(heads: int = 72, variants: int = 2):
    """The LAPACK floor of the acceptance shapes: only the eigenproblems each head needs (numpy,
    two heads at a time in two threads, one BLAS thread each, as the stage runs them), with
    random symmetric matrices; no reading, accumulation or projection is timed."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    floor = {}
    print(f"\nLAPACK floor per job ({heads} heads x {variants} variants, 2 threads):")
    for name, big, half, halves_vectors in (
        ("covariance, D = 1024", 1024, 1024, True),
        ("Gram, N = 3072", 3072, 1536, True),
    ):
        mats = [(lambda m: m @ m.T)(rng.standard_normal((big, big))) for _ in range(2)]
        hm = [(lambda m: m @ m.T)(rng.standard_normal((half, half))) for _ in range(4)]

        def one_head(i):
            np.linalg.eigvalsh(mats[i % 2])
            np.linalg.eigh(hm[2 * (i % 2)])
            np.linalg.eigh(hm[2 * (i % 2) + 1])

        with threadpool_limits(1), ThreadPoolExecutor(2) as ex:
            t = time.perf_counter()
            list(ex.map(one_head, range(4)))
            per_head = (time.perf_counter() - t) / 4 * 2  # two heads in flight
        print(
            f"  {name}: eigvalsh({big}) + 2 x eigh({half}) = {per_head:.2f} s per head per thread -> "
            f"{per_head * heads * variants / 2:.0f} s per job"
        )
        floor[name.split(",")[0]] = per_head / 2 / big**3  # seconds per (size³), 2 heads in flight
    return floor


def gemm_gflops() -> float:
    """float64 GEMM rate of one core (GFLOP/s), for the Gram-formation term of the projection."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1024, 4096)), rng.standard_normal((4096, 1024))
    with threadpool_limits(1):
        a @ b
        t = time.perf_counter()
        a @ b
        return 2 * 1024 * 4096 * 1024 / (time.perf_counter() - t) / 1e9


def projection(laws: dict, gbps: float, budget: float, N=10_000, n=512, L=12, H=12):
    from eigenattn.spectra.full_spectra import plan_full

    print(f"\nprojection: n = {n}, N = {N}, {L} x {H} heads, one variant, 2 cores, eigen.gram_memory_mb = {budget:g}")
    for view, D in (("prefix", (n // 2) ** 2), ("all", n * n)):
        for mem in (budget, 16_000):
            p = plan_full(N, D, L, H, N // 2, 8, mem, 2, rank=None)
            law = laws[p.route]
            if p.route == "gram":  # at least the Gram's flops: 5/8 of 2·N²·D by held panels, on 2 cores
                law = (max(law[0], 1.25 / (2 * GEMM * 1e9)), law[1], law[2])
            compute_h = L * H * law_seconds(law, p.route, N, D) / 3600
            # every task reads its layer's chunks (all heads) once per held panel, from that panel on
            panels = -(-N // p.panel_rows)
            rows = sum(N - i * p.panel_rows for i in range(panels)) if p.route == "gram" else N
            read_gb = L * -(-H // p.group) * rows * H * D * 2 / 1e9
            print(
                f"  {view:>6} (D = {D:,}, route {p.route}, budget {mem:g} MB): compute ~{compute_h:,.1f} h "
                f"(fit, eigenproblems from the floor), reads {read_gb:,.0f} GB "
                f"~{read_gb / gbps / 3600:,.1f} h at {gbps:.2f} GB/s, "
                f"peak ~{p.peak_mb() / 1024:,.1f} GB (planner), score store {N * L * H * n * n * 2 / 1e9:,.0f} GB"
            )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=1024, help="eigen.gram_memory_mb")
    ap.add_argument(
        "--heads-budget",
        type=float,
        default=128,
        help="budget of the peak-against-heads check (small enough that 2 x 4 heads fill it)",
    )
    ap.add_argument("--quick", action="store_true", help="smaller grids")
    ap.add_argument("--heads-only", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the synthetic stores in this folder (reused next time)")
    ap.add_argument("--replay", type=Path, help="re-fit and re-project from the JSON lines of an earlier run's output")
    a = ap.parse_args()
    if a.replay:
        for line in a.replay.read_text().splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                REPLAY[r["N"], r["L"], r["H"], r["n"], r["view"]] = r
            elif line.startswith("read throughput"):
                global REPLAY_GBPS
                REPLAY_GBPS = float(line.split(":")[1].split()[0])
    tmp_ctx = tempfile.TemporaryDirectory() if a.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else a.keep
    tmp.mkdir(parents=True, exist_ok=True)
    q = a.quick
    try:
        # A task holds as many heads as its share of the budget allows; with a budget that even 2 x 4
        # heads fill, the peak must not depend on L·H at all.
        hb = a.heads_budget
        heads = [measure(tmp, 1024, L, H, 32, "all", hb) for L, H in ((2, 4), (6, 12), (12, 12))]
        table(f"peak RSS against heads (covariance route, N = 1024, D = 1024, budget {hb:g} MB)", heads, "L·H")
        gheads = [measure(tmp, 768, L, H, 32, "all", hb / 4) for L, H in ((2, 4), (6, 12), (12, 12))]
        table(f"peak RSS against heads (Gram route, N = 768, D = 1024, budget {hb / 4:g} MB)", gheads, "L·H")
        for name, recs in (("covariance", heads), ("gram", gheads)):
            base = recs[0]["peak_mb"]
            print(
                f"{name}: peak RSS 6x12 / 2x4 = {recs[1]['peak_mb'] / base:.2f}, "
                f"12x12 / 2x4 = {recs[2]['peak_mb'] / base:.2f} (target within 1.2)"
            )
        if a.heads_only:
            return
        cov_N = [
            measure(tmp, N, 6, 12, 32, "prefix", a.budget) for N in ([512, 1024, 2048] if q else [768, 1536, 3072])
        ]
        table("covariance route against N (D = 256, 6 x 12 heads)", cov_N, "N")
        cov_D = [measure(tmp, 1024, 6, 12, n, "all", a.budget) for n in ([16, 24] if q else [16, 24, 32])]
        table("covariance route against D (N = 1024, 6 x 12 heads)", cov_D, "D")
        gram_N = [measure(tmp, N, 6, 12, 64, "prefix", a.budget) for N in ([128, 256, 512] if q else [256, 512, 1024])]
        table("Gram route against N (D = 1024, 6 x 12 heads)", gram_N, "N")
        gram_D = [measure(tmp, 256, 6, 12, n, "all", a.budget) for n in ([24, 32] if q else [24, 32, 48, 64])]
        table("Gram route against D (N = 256, 6 x 12 heads)", gram_D, "D")
        laws = {
            "covariance": fit_law(cov_N + cov_D + heads, "covariance"),
            "gram": fit_law(gram_N + gram_D + gheads, "gram"),
        }
        a_, b_, c_ = laws["covariance"]
        print(f"fit, covariance route: time per head ~ {a_:.3g}·N·D² + {b_:.3g}·D³ + {c_:.3g} s")
        a_, b_, c_ = laws["gram"]
        print(f"fit, Gram route: time per head ~ {a_:.3g}·N²·D + {b_:.3g}·N³ + {c_:.3g} s")
        recs = heads + gheads + cov_N + cov_D + gram_N + gram_D
        ratio = [r["plan_peak_mb"] / r["peak_mb"] for r in recs]
        print(f"planner's peak / measured peak: {min(ratio):.2f}–{max(ratio):.2f} (>= 1: the rule asks for enough)")
        gbps = REPLAY_GBPS if REPLAY else read_throughput(tmp)
        global GEMM
        GEMM = gemm_gflops()
        print(f"float64 GEMM, one core: {GEMM:.0f} GFLOP/s")
        print(f"read throughput (ScoreSource, one core): {gbps:.2f} GB/s")
        floor = eigen_floor()  # after every measurement: its matrices would count in the children's peaks
        # the eigenproblem term from the largest size measured (the floor), not extrapolated from the grids
        laws = {
            "covariance": (laws["covariance"][0], floor["covariance"], laws["covariance"][2]),
            "gram": (laws["gram"][0], floor["Gram"], laws["gram"][2]),
        }
        projection(laws, gbps, a.budget)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
        else:
            shutil.rmtree(tmp / "unused", ignore_errors=True)


if __name__ == "__main__":
    main()
