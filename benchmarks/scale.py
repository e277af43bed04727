"""Time and peak memory of the full-matrix eigen stage against N, D and the number of heads, on
synthetic float16 stores with real head counts, for both exact routes; and a paper-scale projection.

    python benchmarks/scale.py                     # the default grids (about 15 minutes on 2 cores)
    python benchmarks/scale.py --quick             # smaller grids (about 4 minutes)
    python benchmarks/scale.py --heads-only        # just the peak-RSS-against-heads check
    python benchmarks/scale.py --smoke             # one tiny point per table, every step once (seconds)

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


# Points (N, L, H, n) per table. The heads checks use view `all`; the grids vary N on view `prefix`
# and D (through n) on view `all`, with the route's D <= N (covariance) or D > N (Gram) kept.
GRIDS = {
    "default": {
        "heads": [(1024, L, H, 32) for L, H in ((2, 4), (6, 12), (12, 12))],
        "gram_heads": [(768, L, H, 32) for L, H in ((2, 4), (6, 12), (12, 12))],
        "cov_N": [(N, 6, 12, 32) for N in (768, 1536, 3072)],
        "cov_D": [(1024, 6, 12, n) for n in (16, 24, 32)],
        "gram_N": [(N, 6, 12, 64) for N in (256, 512, 1024)],
        "gram_D": [(256, 6, 12, n) for n in (24, 32, 48, 64)],
    },
    "quick": {
        "heads": [(1024, L, H, 32) for L, H in ((2, 4), (6, 12), (12, 12))],
        "gram_heads": [(768, L, H, 32) for L, H in ((2, 4), (6, 12), (12, 12))],
        "cov_N": [(N, 6, 12, 32) for N in (512, 1024, 2048)],
        "cov_D": [(1024, 6, 12, n) for n in (16, 24)],
        "gram_N": [(N, 6, 12, 64) for N in (128, 256, 512)],
        "gram_D": [(256, 6, 12, n) for n in (24, 32)],
    },
    "smoke": {
        "heads": [(64, 1, 2, 8), (64, 2, 2, 8)],
        "gram_heads": [(32, 1, 2, 8), (32, 2, 2, 8)],
        "cov_N": [(64, 1, 2, 8)],
        "cov_D": [(48, 1, 2, 4)],
        "gram_N": [(16, 1, 2, 16)],
        "gram_D": [(16, 1, 2, 8)],
    },
}
# The fixed sizes outside the grids: the read-throughput store's sequences, and the eigenproblem
# sizes of the LAPACK floor (the acceptance shapes: D = 1024 covariance, N = 3072 Gram).
SIZES = {"default": (2048, 1024, 3072), "quick": (2048, 1024, 3072), "smoke": (64, 64, 96)}

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


def _title(what: str, recs, budget: float | None = None) -> str:
    """'covariance route against N (D = 256, 6 x 12 heads)': what the table's records hold fixed."""
    fixed = [f"{k} = {recs[0][k]}" for k in ("N", "D") if len({r[k] for r in recs}) == 1]
    if len({(r["L"], r["H"]) for r in recs}) == 1:
        fixed.append(f"{recs[0]['L']} x {recs[0]['H']} heads")
    if budget is not None:
        fixed.append(f"budget {budget:g} MB")
    return f"{what.rstrip(')')} ({', '.join(fixed)})" if "(" not in what else f"{what}, {', '.join(fixed)})"


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


def read_throughput(tmp: Path, N: int = 2048) -> float:
    """GB/s of float16 scores read through ScoreSource (one layer, all heads, N sequences)."""
    from eigenattn.storage.score_source import open_score_source

    store = tmp / f"s-{N}-2x12-32.zarr"
    if not store.exists():
        make_store(store, N, 2, 12, 32)
    src, _ = open_score_source([store])
    t = time.perf_counter()
    for layer in range(2):
        src.read(0, N, layer, slice(None))
    return 2 * N * 12 * 32 * 32 * 2 / (time.perf_counter() - t) / 1e9


def eigen_floor(heads: int = 72, variants: int = 2, cov_D: int = 1024, gram_N: int = 3072):
    """The LAPACK floor of the acceptance shapes: only the eigenproblems each head needs (numpy,
    two heads at a time in two threads, one BLAS thread each, as the stage runs them), with
    random symmetric matrices; no reading, accumulation or projection is timed."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    floor = {}
    print(f"\nLAPACK floor per job ({heads} heads x {variants} variants, 2 threads):")
    for name, big, half, halves_vectors in (
        (f"covariance, D = {cov_D}", cov_D, cov_D, True),
        (f"Gram, N = {gram_N}", gram_N, gram_N // 2, True),
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=1024, help="eigen.gram_memory_mb")
    ap.add_argument(
        "--heads-budget",
        type=float,
        default=128,
        help="budget of the peak-against-heads check (small enough that 2 x 4 heads fill it)",
    )
    ap.add_argument("--quick", action="store_true", help="smaller grids")
    ap.add_argument("--smoke", action="store_true", help="one tiny point per table: does every step still run?")
    ap.add_argument("--heads-only", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the synthetic stores in this folder (reused next time)")
    ap.add_argument("--replay", type=Path, help="re-fit and re-project from the JSON lines of an earlier run's output")
    a = ap.parse_args(argv)
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
    mode = "smoke" if a.smoke else "quick" if a.quick else "default"
    grid = GRIDS[mode]
    try:
        # A task holds as many heads as its share of the budget allows; with a budget that even 2 x 4
        # heads fill, the peak must not depend on L·H at all.
        hb = a.heads_budget
        heads = [measure(tmp, N, L, H, n, "all", hb) for N, L, H, n in grid["heads"]]
        table(_title("peak RSS against heads (covariance route", heads, hb), heads, "L·H")
        gheads = [measure(tmp, N, L, H, n, "all", hb / 4) for N, L, H, n in grid["gram_heads"]]
        table(_title("peak RSS against heads (Gram route", gheads, hb / 4), gheads, "L·H")
        for name, recs in (("covariance", heads), ("gram", gheads)):
            base = recs[0]
            ratios = ", ".join(
                f"{r['L']}x{r['H']} / {base['L']}x{base['H']} = {r['peak_mb'] / base['peak_mb']:.2f}" for r in recs[1:]
            )
            print(f"{name}: peak RSS {ratios} (target within 1.2)")
        if a.heads_only:
            return
        cov_N = [measure(tmp, N, L, H, n, "prefix", a.budget) for N, L, H, n in grid["cov_N"]]
        table(_title("covariance route against N", cov_N), cov_N, "N")
        cov_D = [measure(tmp, N, L, H, n, "all", a.budget) for N, L, H, n in grid["cov_D"]]
        table(_title("covariance route against D", cov_D), cov_D, "D")
        gram_N = [measure(tmp, N, L, H, n, "prefix", a.budget) for N, L, H, n in grid["gram_N"]]
        table(_title("Gram route against N", gram_N), gram_N, "N")
        gram_D = [measure(tmp, N, L, H, n, "all", a.budget) for N, L, H, n in grid["gram_D"]]
        table(_title("Gram route against D", gram_D), gram_D, "D")
        throughput_N, floor_D, floor_N = SIZES[mode]
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
        gbps = REPLAY_GBPS if REPLAY else read_throughput(tmp, throughput_N)
        global GEMM
        GEMM = gemm_gflops()
        print(f"float64 GEMM, one core: {GEMM:.0f} GFLOP/s")
        print(f"read throughput (ScoreSource, one core): {gbps:.2f} GB/s")
        # after every measurement: its matrices would count in the children's peaks
        floor = eigen_floor(cov_D=floor_D, gram_N=floor_N)
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
