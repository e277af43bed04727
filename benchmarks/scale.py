"""Time and peak memory of the eigen stage against the number of sequences N, on synthetic stores.

    python benchmarks/scale.py                  # n = 256, N = 256 … 2048 (about ten minutes on 2 cores)
    python benchmarks/scale.py --n 128 --N 128 256 512

Each measurement runs in its own process (so its peak RSS is its own): the row analysis
(``run_rows``) and the full-matrix analysis (``run_full``, streamed Gram with a block budget of
``--budget`` MB) of one synthetic float16 store (N, L, H, n, n). It prints time and peak RSS per N,
their growth exponents (log-log slope against N), the part of the full-matrix peak that the N × N
Gram matrices explain, and a projection of a paper-scale run (--project-*) from the fitted laws.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
from eigenattn.eigen_stores import run_full, run_rows
from eigenattn.scheduler import dask_scheduler
store, out, stage, view, budget = sys.argv[1:6]
t = time.perf_counter()
with dask_scheduler("threads", 2):
    if stage == "rows":
        run_rows([store], out + "/rows.zarr", view, ["raw"], 8, halves_path=out + "/halves.zarr")
    else:
        run_full([store], out + "/full.zarr", view, ["raw"], float(budget))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_store(path: Path, N: int, L: int, H: int, n: int, batch: int) -> int:
    """A float16 score store of low-rank-plus-noise blocks in the extraction stage's layout
    (eigenattn.store.create_score_store: shards of ``batch`` sequences, default codecs), written
    batch by batch; returns its bytes."""
    import zarr

    from eigenattn.store import create_score_store, finish_store

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = create_score_store(g, ids=np.zeros((N, n), dtype=np.int32), passage_ids=np.arange(N), layers=range(L),
                             heads=H, kv_heads=H, seq_len=n, dtype="float16", compression="none",
                             chunk_sequences=batch, shard_sequences=batch)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((L, H, 8, n), dtype=np.float32)
    for s in range(0, N, batch):
        b = min(batch, N - s)
        coef = rng.standard_normal((b, L, H, n, 8), dtype=np.float32)
        arr[s:s + b] = (np.einsum("blhqr,lhrk->blhqk", coef, basis)
                        + rng.standard_normal((b, L, H, n, n), dtype=np.float32)).astype(np.float16)
    g.attrs.update({"model": "synthetic", "layers": list(range(L)), "heads": H, "seq_len": n, "causal": False,
                    "dtype": "float16", "complete": True})
    finish_store(path)
    return N * L * H * n * n * 2


def measure(store: Path, stage: str, view: str, budget: float) -> dict:
    with tempfile.TemporaryDirectory(dir=store.parent) as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(store), out, stage, view, str(budget)],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--N", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--view", default="prefix")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=float, default=256, help="eigen.gram_memory_mb of the full-matrix stage")
    ap.add_argument("--project-n", type=int, default=512)
    ap.add_argument("--project-N", type=int, default=10_000)
    ap.add_argument("--project-layers", type=int, default=12)
    ap.add_argument("--project-heads", type=int, default=12)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for N in a.N:
            store = Path(tmp) / f"s{N}.zarr"
            t = time.perf_counter()
            nbytes = make_store(store, N, a.layers, a.heads, a.n, a.batch)
            rec = {"N": N, "data_mb": nbytes / 2 ** 20, "write_s": time.perf_counter() - t}
            for stage in ("rows", "full"):
                m = measure(store, stage, a.view, a.budget)
                rec[f"{stage}_s"], rec[f"{stage}_peak_mb"] = m["seconds"], m["peak_mb"]
            rec["gram_mb"] = 3 * 2 * a.heads * N * N * 8 / 2 ** 20  # G0, centred copy, eigh work; 2 layers in flight
            rows.append(rec)
            print(json.dumps({k: round(v, 2) for k, v in rec.items()}), flush=True)
            for p in store.parent.glob(f"s{N}.zarr"):
                import shutil

                shutil.rmtree(p)
    N = np.array([r["N"] for r in rows], float)
    print(f"\nn = {a.n}, view {a.view}, {a.layers} layers x {a.heads} heads, block budget {a.budget:g} MB")
    print(f"{'N':>6} {'data MB':>9} {'rows s':>8} {'rows MB':>8} {'full s':>8} {'full MB':>8} {'full-Gram MB':>13}")
    for r in rows:
        print(f"{r['N']:>6} {r['data_mb']:>9.0f} {r['rows_s']:>8.1f} {r['rows_peak_mb']:>8.0f} {r['full_s']:>8.1f} "
              f"{r['full_peak_mb']:>8.0f} {r['full_peak_mb'] - r['gram_mb']:>13.0f}")
    ex = {k: slope(N, [r[k] for r in rows]) for k in ("rows_s", "rows_peak_mb", "full_s", "full_peak_mb")}
    print("growth exponents against N: " + ", ".join(f"{k} ~ N^{v:.2f}" for k, v in ex.items()))
    resid = [r["full_peak_mb"] - r["gram_mb"] for r in rows]
    print(f"full-matrix peak minus the N x N Gram term: {min(resid):.0f}–{max(resid):.0f} MB (flat if the "
          "streaming holds)")
    # Projection: rows time ~ data (N·L·H·n²); full time ~ N²·L·H·D + the data pass; memory from the laws above.
    scale_data = (a.project_N * a.project_layers * a.project_heads * a.project_n ** 2) / \
        (N[-1] * a.layers * a.heads * a.n ** 2)
    D = (a.project_n // 2) ** 2 if a.view == "prefix" else a.project_n ** 2
    D0 = (a.n // 2) ** 2 if a.view == "prefix" else a.n ** 2
    scale_gram = (a.project_N ** 2 * a.project_layers * a.project_heads * D) / (N[-1] ** 2 * a.layers * a.heads * D0)
    disk_gb = a.project_N * a.project_layers * a.project_heads * a.project_n ** 2 * 2 / 2 ** 30
    gram_gb = 3 * 2 * a.project_heads * a.project_N ** 2 * 8 / 2 ** 30
    print(f"\nprojection: n = {a.project_n}, N = {a.project_N}, {a.project_layers} x {a.project_heads} heads, "
          f"view {a.view}, 2 cores:")
    print(f"  score store (float16): {disk_gb:,.0f} GB per split")
    print(f"  rows: {rows[-1]['rows_s'] * scale_data / 3600:,.1f} h, peak ~{rows[-1]['rows_peak_mb']:.0f} MB")
    print(f"  full: {rows[-1]['full_s'] * scale_gram / 3600:,.1f} h, peak ~{gram_gb + a.budget / 1024 + 0.5:,.1f} GB "
          f"(the N x N Gram of {a.project_heads} heads, 2 layers in flight, plus the block budget)")


if __name__ == "__main__":
    main()
