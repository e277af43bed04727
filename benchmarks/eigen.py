"""Row-stage benchmark: this pipeline's streaming Dask reduction against the GEMM floor and sklearn.

    python benchmarks/eigen.py [--gb 2] [--threads 2]
    python benchmarks/eigen.py --smoke    # 16 sequences (16 MB): every step once, in seconds

Builds a synthetic score store shaped (N, L, H, n, n) in float16 with the extraction stage's
chunking (about --gb GB uncompressed), then times the row analysis (raw variant, `all` view)
three ways, each in its own process so that peak RSS is its own:

(a) in-memory numpy float64 X^T X on the same rows (the compute floor; the load is not timed);
(b) this stage: eigenattn.spectra.rows.row_spectrum streaming from Zarr (moments + eigh);
(c) sklearn IncrementalPCA run to the same eigenvalues (partial_fit over the same chunks).

It prints the time ratios, peak RSS of each, and (b) again on a quarter of the sequences to show
that its peak memory does not grow with N. Targets: b/a <= 1.2, c/b >= 5, RSS(b) <= 25% of data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

L, H, n = 4, 8, 128
SMOKE = "--gb 0.016 --threads 1".split()


def make_store(path: Path, N: int, batch: int = 8, seed: int = 0):
    import zarr

    from eigenattn.storage.store import create_score_store

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    a = create_score_store(
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
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((L, H, 16, n)).astype(np.float32)
    for s in range(0, N, batch):
        b = min(batch, N - s)
        coef = rng.standard_normal((b, L, H, n, 16), dtype=np.float32)
        block = np.einsum("blhqr,lhrk->blhqk", coef, basis) + rng.standard_normal((b, L, H, n, n), dtype=np.float32)
        a[s : s + b] = block.astype(np.float16)
    g.attrs.update(
        {
            "model": "bench",
            "layers": list(range(L)),
            "heads": H,
            "seq_len": n,
            "causal": False,
            "dtype": "float16",
            "complete": True,
        }
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, store: str, threads: int, N: int):
    import zarr

    out = {"method": method}
    if method == "b":
        from eigenattn.spectra.rows import row_spectrum
        from eigenattn.spectra.scheduler import dask_scheduler
        from eigenattn.storage.store import open_scores

        t = time.perf_counter()
        with dask_scheduler("threads", threads):
            x, _ = open_scores([store])
            res = row_spectrum(x[:N], "all", "raw", causal=False, split_every=8)
        out["seconds"] = time.perf_counter() - t
        out["eigenvalues"] = res["heads"]["eigenvalues"][:, :, :8].tolist()
    elif method == "a":
        arr = zarr.open_group(store, mode="r")["scores"]
        X = [
            np.ascontiguousarray(arr[:N, l].astype(np.float64).transpose(1, 0, 2, 3).reshape(H, -1, n))
            for l in range(L)
        ]  # rows per head, all in memory
        t = time.perf_counter()
        eig = []
        for l in range(L):
            for h in range(H):
                x = X[l][h]
                mu = x.mean(0)
                c = (x.T @ x - len(x) * np.outer(mu, mu)) / (len(x) - 1)
                eig.append(np.linalg.eigvalsh(c)[::-1][:8])
        out["seconds"] = time.perf_counter() - t
        out["eigenvalues"] = np.array(eig).reshape(L, H, 8).tolist()
    elif method == "c":
        from sklearn.decomposition import IncrementalPCA

        arr = zarr.open_group(store, mode="r")["scores"]
        batch = arr.chunks[0]
        t = time.perf_counter()
        ipcas = [[IncrementalPCA(n_components=n) for _ in range(H)] for _ in range(L)]
        for s in range(0, N, batch):
            for l in range(L):
                block = arr[s : s + batch, l].astype(np.float64)  # (b, H, n, n)
                for h in range(H):
                    ipcas[l][h].partial_fit(block[:, h].reshape(-1, n))
        out["seconds"] = time.perf_counter() - t
        out["eigenvalues"] = [[p.explained_variance_[:8].tolist() for p in row] for row in ipcas]
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def run_child(method, store, threads, N):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    p = subprocess.run(
        [sys.executable, __file__, "--child", method, "--store", store, "--threads", str(threads), "--n-seq", str(N)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child")
    ap.add_argument("--store")
    ap.add_argument("--n-seq", type=int)
    ap.add_argument("--smoke", action="store_true", help=f"a smoke run: {' '.join(SMOKE)} (overrides those options)")
    a = ap.parse_args(argv)
    if a.smoke:  # the smoke settings come last, so they win over the same options given before
        a = ap.parse_args([*(sys.argv[1:] if argv is None else argv), *SMOKE])
    if a.child:
        return child(a.child, a.store, a.threads, a.n_seq)

    N = int(a.gb * 1e9 / (L * H * n * n * 2)) // 8 * 8
    tmp = Path(a.workdir or tempfile.mkdtemp(prefix="eigenattn-bench-"))
    store = tmp / "scores.zarr"
    data_mb = N * L * H * n * n * 2 / 1e6
    try:
        t = time.perf_counter()
        make_store(store, N)
        print(
            f"synthetic store: N={N}, L={L}, H={H}, n={n}, float16, {data_mb:.0f} MB uncompressed "
            f"(built in {time.perf_counter() - t:.0f} s); rows per head {N * n}, d={n}"
        )
        res = {m: run_child(m, str(store), a.threads, N) for m in ("a", "b", "c")}
        small = run_child("b", str(store), a.threads, N // 4)
    finally:
        if a.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    ea, eb, ec = (np.array(res[m]["eigenvalues"]) for m in "abc")
    for m, label in (
        ("a", "numpy X^T X in memory (floor)"),
        ("b", "eigenattn row stage (streaming)"),
        ("c", "sklearn IncrementalPCA"),
    ):
        r = res[m]
        print(f"({m}) {label:34s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:7.0f} MB")
    print(
        f"(b) on N/4={N // 4} sequences: {small['seconds']:.1f} s, peak RSS {small['peak_rss_mb']:.0f} MB "
        f"(vs {res['b']['peak_rss_mb']:.0f} MB at N={N})"
    )
    print(
        f"max relative eigenvalue difference: b vs a {np.abs(eb - ea).max() / ea.max():.1e}, "
        f"c vs a {np.abs(ec - ea).max() / ea.max():.1e}"
    )
    ba = res["b"]["seconds"] / res["a"]["seconds"]
    cb = res["c"]["seconds"] / res["b"]["seconds"]
    rss = res["b"]["peak_rss_mb"] / data_mb
    print(f"b/a = {ba:.2f} (target <= 1.2): {'OK' if ba <= 1.2 else 'MISSED'}")
    print(f"c/b = {cb:.1f} (target >= 5): {'OK' if cb >= 5 else 'MISSED'}")
    print(f"peak RSS of b = {100 * rss:.0f}% of the data (target <= 25%): {'OK' if rss <= 0.25 else 'MISSED'}")


if __name__ == "__main__":
    main()
