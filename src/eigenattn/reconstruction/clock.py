"""Three cost axes of each method (docs/method.md, "Cost by the clock"): multiply-adds, key blocks touched, and time
by the clock, each as a share of exact causal attention of one head on the same shapes and device.

The unit is a whole causal head of n queries (batch 1, ``heads`` heads, ``d_head``), float32, the
way a decoder's prefill runs it:

- **whole scope** (every query): ``sink_window`` and ``vertical_slash`` (:mod:`.kernels`);
- **view scope** (the ``prefix`` view, queries [n/2, n) against keys [0, n/2), the rest exact):
  ``nystrom`` (m = s landmarks), ``paper`` (a dense map W (d×s), the eigenspace and
  conditional-Gaussian estimators' deployed form) and ``subset_only`` (the s keys alone);
- ``flex_causal``: exact causal attention through FlexAttention, the block kernel's own overhead
  against SDPA's fused one (its MAC and block shares are 1).

Axes:

- ``macs_share``: §11's count (:mod:`eigenattn.reconstruction.cost`) over exact causal attention,
  ``n(n+1)·d_head`` (scores and P·V of the visible keys). A whole-scope method's rows keep
  ``min(s, i+1)`` keys (row i sees i+1), so its count is §11's ``2·n·s·d_head`` with each row
  capped at its visible keys (plus ``q_last·n·d_head`` for vertical-slash's pattern). A view-scope
  method pays ``view_macs`` on the view block and exact attention elsewhere.
- ``blocks_share``: key blocks of ``block`` (128) keys touched, summed over query blocks of
  ``block`` rows: a (query block, key block) counts when any query of the block uses any key of
  it; over the blocks exact causal attention touches. Averaged over heads.
- ``time_share``: the median of ``repeats`` warm runs of the method's real kernel (every head in
  one call) over the median of SDPA's (``is_causal=True``) on the same Q, K, V. Compilation, the
  first call's extra time and any input-independent setup (a block mask) are ``compile_s``, apart.
  Vertical-slash's index (pattern and per-row keys) depends on the input, so it is timed.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from eigenattn.config.needs import cpu_name
from eigenattn.reconstruction import kernels
from eigenattn.reconstruction.cost import OVERHEAD_N, exact_macs, view_macs
from eigenattn.reconstruction.estimators import select_subset

WHOLE = ("sink_window", "vertical_slash")
VIEW = ("nystrom", "paper", "subset_only")
METHODS = ("flex_causal", *WHOLE, *VIEW)
COLUMNS = (
    "method",
    "s",
    "n",
    "macs_share",
    "blocks_share",
    "time_share",
    "time_s",
    "sdpa_s",
    "compile_s",
    "device",
    "torch_version",
    "threads",
)
_COST_NAME = {"nystrom": "nystrom", "paper": "conditional_gaussian", "subset_only": "subset_only"}


def causal_macs(n: int, d_head: int) -> int:
    """Exact causal attention of one head: row i scores and weighs its i+1 visible keys."""
    return n * (n + 1) * d_head


def capped_keys(n: int, s: int) -> int:
    """Σ_i min(s, i+1): the keys a whole-scope s-key method scores over n causal rows."""
    s = min(int(s), n)
    return s * n - s * (s - 1) // 2


def method_macs(method: str, *, n: int, d_head: int, s: int, q_last: int) -> int:
    """MACs of one head under ``method`` (see the module docstring)."""
    if method == "flex_causal":
        return causal_macs(n, d_head)
    if method in WHOLE:
        pattern = q_last * n * d_head if method == "vertical_slash" else 0
        return pattern + 2 * capped_keys(n, s) * d_head
    if method in VIEW:
        nq, d = n - n // 2, n // 2
        view = view_macs(_COST_NAME[method], nq=nq, d=d, d_head=d_head, s=s, q_last=q_last)
        return causal_macs(n, d_head) - exact_macs(nq, d, d_head) + view
    raise ValueError(f"unknown method '{method}' (use one of {', '.join(METHODS)})")


def macs_share(method: str, *, n: int, d_head: int, s: int, q_last: int) -> float:
    return method_macs(method, n=n, d_head=d_head, s=s, q_last=q_last) / causal_macs(n, d_head)


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int):
    """(first call, median of ``repeats`` warm calls) in seconds."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def prefix_view(n: int):
    return (n // 2, n), (0, n // 2)


def paper_map(method: str, H: int, d: int, s: int, seed: int, dev):
    """(T, W, b) of a timed paper estimator on a view of d keys: strided subsets; ``subset_only``
    the identity on T (−inf elsewhere), any other a dense random map (the work is the same)."""
    T = torch.from_numpy(np.stack([select_subset("strided", d, s, seed=seed) for _ in range(H)])).to(dev)
    if method == "subset_only":
        W = torch.zeros((H, d, s), device=dev).scatter_(1, T[:, None, :], 1.0)
        b = torch.full((H, d), float("-inf"), device=dev).scatter_(1, T, 0.0)
    else:
        rng = np.random.default_rng(seed)
        W = torch.from_numpy(0.1 * rng.standard_normal((H, d, s)).astype(np.float32)).to(dev)
        b = torch.from_numpy(rng.standard_normal((H, d)).astype(np.float32)).to(dev)
    return T, W, b


def kernel_call(method: str, q, k, v, s: int, *, sinks: int, q_last: int, pinv: str, compiled: bool, seed: int):
    """(setup seconds, the method's kernel as a closure, blocks touched per head (mean)) for Q, K, V
    (1, H, n, dh). Setup is input-independent work done once (a block mask, a fitted map)."""
    H, n = q.shape[1], q.shape[2]
    dev = q.device
    t = time.perf_counter()
    if method == "flex_causal":
        bm = kernels.create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, n, n, device=dev)
        fn = lambda: kernels.flex(compiled)(q, k, v, block_mask=bm)  # noqa: E731
        blocks = float(kernels.blockmask_blocks(bm).float().mean())
    elif method == "sink_window":
        bm = kernels.sink_window_block_mask(n, s, sinks, H, dev)
        fn = lambda: kernels.sink_window_attention(q, k, v, s, sinks, compiled=compiled, block_mask=bm)  # noqa: E731
        blocks = float(kernels.blockmask_blocks(bm).float().mean())
    elif method == "vertical_slash":
        fn = lambda: kernels.vertical_slash_attention(q, k, v, s, q_last)  # noqa: E731
        index = kernels.vertical_slash_index(q[0], k[0], s, q_last)
        blocks = float(kernels.vs_blocks(index, n).sum(dim=(1, 2)).float().mean())
    else:
        qr, kr = prefix_view(n)
        d = kr[1] - kr[0]
        if method == "nystrom":
            fn = lambda: kernels.nystrom_attention(  # noqa: E731
                q, k, v, s, pinv=pinv, query_range=qr, key_range=kr, causal=True
            )
            blocks = float(kernels.view_blocks(n, qr, kr, True).float().mean())
        else:
            T, W, b = paper_map(method, H, d, s, seed, dev)
            view_keys = T.cpu() if method == "subset_only" else None
            blocks = float(kernels.view_blocks(n, qr, kr, True, view_keys).float().mean())
            fn = lambda: kernels.partial_attention(  # noqa: E731
                q, k, v, T, W, b, query_range=qr, key_range=kr, causal=True
            )
    return time.perf_counter() - t, fn, blocks


def position_code(n: int, d_head: int, amplitude: float = 2.0) -> torch.Tensor:
    """(n, d_head) sines and cosines of the position at geometric frequencies: added to Q and K,
    it makes q_i·k_j largest near i = j."""
    pos = torch.arange(n)[:, None] / (1.5 ** torch.arange(d_head // 2))[None, :]
    return amplitude * torch.cat([pos.sin(), pos.cos()], dim=-1)


def latency_table(
    ns,
    subset_sizes,
    methods=METHODS,
    *,
    d_head: int,
    heads: int,
    threads: int,
    device: str,
    repeats: int,
    compiled: bool,
    sinks: int,
    q_last: int,
    pinv: str,
    seed: int,
    inputs: str = "random",
    block: int = kernels.BLOCK,
    log=None,
) -> pd.DataFrame:
    """The latency table: one row per (n, method, s), with :data:`COLUMNS` (see the module
    docstring), plus ``scope``, ``blocks`` (touched per head), ``exact_blocks`` and ``index_s``
    (vertical-slash: the median time of its index alone, part of ``time_s``; NaN for the others). Q, K and V are
    random normal (1, heads, n, d_head) float32, one set per n; ``threads`` sets torch's CPU threads.
    ``inputs="local"`` adds a smooth position code to Q and K (:func:`position_code`), so that every
    head attends mostly near its diagonal, as many real heads do: vertical-slash then runs its
    diagonals as a band rather than as scattered per-row keys (random Q, K: its worst case)."""
    if block != kernels.BLOCK:
        raise ValueError(f"the kernels use blocks of {kernels.BLOCK} keys")
    torch.set_num_threads(int(threads))
    dev = torch.device(device)
    name = device_name(dev)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for n in ns:
            q, k, v = (torch.randn(1, heads, n, d_head, generator=gen) for _ in range(3))
            if inputs == "local":
                q, k = q + position_code(n, d_head), k + position_code(n, d_head)
            elif inputs != "random":
                raise ValueError(f"inputs '{inputs}': use random or local")
            q, k, v = q.to(dev), k.to(dev), v.to(dev)
            _, sdpa_s = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dev, repeats)
            exact_blocks = kernels.causal_blocks(n, block)
            for method in methods:
                for s in [0] if method == "flex_causal" else subset_sizes:
                    if method in VIEW and s > n // 2 or s > n:
                        continue
                    setup, fn, blocks = kernel_call(
                        method, q, k, v, s, sinks=sinks, q_last=q_last, pinv=pinv, compiled=compiled, seed=seed
                    )
                    first, t = _timed(fn, dev, repeats)
                    index_s = float("nan")
                    if method == "vertical_slash":  # its index alone (pattern and per-row keys), within time_s
                        _, index_s = _timed(lambda: kernels.vertical_slash_index(q[0], k[0], s, q_last), dev, repeats)
                    row = {
                        "method": method,
                        "s": s,
                        "n": n,
                        "macs_share": macs_share(method, n=n, d_head=d_head, s=max(s, 1), q_last=q_last),
                        "blocks_share": blocks / exact_blocks,
                        "time_share": t / sdpa_s,
                        "time_s": t,
                        "sdpa_s": sdpa_s,
                        "compile_s": setup + max(first - t, 0.0),
                        "device": name,
                        "torch_version": torch.__version__,
                        "threads": int(threads),
                        "scope": "whole" if method in WHOLE or method == "flex_causal" else "view",
                        "blocks": blocks,
                        "exact_blocks": exact_blocks,
                        "index_s": index_s,
                    }
                    rows.append(row)
                    if log is not None:
                        log(row)
    return pd.DataFrame(rows, columns=[*COLUMNS, "scope", "blocks", "exact_blocks", "index_s"])


def disagreements(table: pd.DataFrame, factor: float = 2.0) -> pd.DataFrame:
    """Rows where the MAC share and the time share differ by more than ``factor`` either way."""
    ratio = table["time_share"] / table["macs_share"]
    return table.assign(time_over_macs=ratio)[(ratio > factor) | (ratio < 1 / factor)]


# ---------------------------------------------------------------------------------------------
# view scope at a run's own geometry (the pipeline's latency table, rule latency_table)

VIEW_METHODS = ("sink_window", "vertical_slash", "nystrom", "paper", "subset_only")


def view_kernel_call(method, q, k, v, s, *, query_range, key_range, causal, sinks, q_last, pinv, compiled, seed):
    """(setup seconds, closure) of ``method`` on the view block, exact elsewhere (the plug-in's
    scope), for Q, K, V (1, H, n, dh)."""
    H = q.shape[1]
    dev = q.device
    view = {"query_range": query_range, "key_range": key_range, "causal": causal}
    d = key_range[1] - key_range[0]
    t = time.perf_counter()
    if method == "sink_window":
        bm = kernels.sink_window_view_block_mask(q.shape[2], s, sinks, device=dev, **view)
        fn = lambda: kernels.sink_window_view_attention(q, k, v, s, sinks, compiled=compiled, block_mask=bm, **view)  # noqa: E731
    elif method == "vertical_slash":
        fn = lambda: kernels.vertical_slash_view_attention(q, k, v, s, q_last, **view)  # noqa: E731
    elif method == "nystrom":
        fn = lambda: kernels.nystrom_attention(q, k, v, s, pinv=pinv, **view)  # noqa: E731
    else:
        T, W, b = paper_map(method, H, d, s, seed, dev)
        fn = lambda: kernels.partial_attention(q, k, v, T, W, b, **view)  # noqa: E731
    return time.perf_counter() - t, fn


def view_latency_table(
    n: int,
    subset_sizes,
    *,
    query_range,
    key_range,
    causal: bool,
    d_head: int,
    heads: int,
    threads: int,
    device: str,
    repeats: int,
    compiled: bool,
    sinks: int,
    q_last: int,
    pinvs,
    seed: int,
    methods=VIEW_METHODS,
) -> pd.DataFrame:
    """Each method at each s on a view of length ``n`` (exact outside the view) against SDPA on the
    same Q, K, V (``is_causal`` when the model is causal), SDPA timed again beside each method so
    that drift hits both alike: ``time_share`` and the setup apart, with the device, torch version
    and threads. Nyström is timed with each of ``pinvs`` (its ``strategy``; ``-`` for the others).
    Q and K carry :func:`position_code` (heads that attend near their diagonal).
    ``overhead_bound``: n < :data:`OVERHEAD_N`, where the shares measure call overhead more than
    work, a reference only."""
    torch.set_num_threads(int(threads))
    dev = torch.device(device)
    name = device_name(dev)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d_head, generator=gen) for _ in range(3))
    q, k = q + position_code(n, d_head), k + position_code(n, d_head)
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    d = key_range[1] - key_range[0]
    nq = query_range[1] - query_range[0]
    rows = []
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    with torch.inference_mode():
        _timed(sdpa, dev, repeats)  # warm
        for method in methods:
            for pinv in pinvs if method == "nystrom" else ["-"]:
                for s in subset_sizes:
                    if not 1 <= s <= (min(nq, d) if method == "nystrom" else d):
                        continue
                    setup, fn = view_kernel_call(
                        method, q, k, v, int(s), query_range=query_range, key_range=key_range, causal=causal,
                        sinks=sinks, q_last=q_last, pinv=pinv, compiled=compiled, seed=seed,
                    )  # fmt: skip
                    first, t = _timed(fn, dev, repeats)
                    _, sdpa_s = _timed(sdpa, dev, repeats)
                    rows.append(
                        {
                            "method": method,
                            "strategy": pinv,
                            "s": int(s),
                            "n": n,
                            "time_share": t / sdpa_s,
                            "time_s": t,
                            "sdpa_s": sdpa_s,
                            "compile_s": setup + max(first - t, 0.0),
                            "device": name,
                            "torch_version": torch.__version__,
                            "threads": int(threads),
                            "compiled": bool(compiled),
                            "overhead_bound": n < OVERHEAD_N,
                        }
                    )
    return pd.DataFrame(rows)
