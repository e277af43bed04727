"""Plans that run faster (docs/method.md §15): prefill of a causal model under a whole-scope,
time-priced per-head plan against the same model on SDPA, side by side in one run.

    python benchmarks/plans_speed.py                       # smollm2, n 2048 4096 8192, 1 thread and all, budget 0.3
    python benchmarks/plans_speed.py --lengths 8192 --threads 1 --out speed.csv
    python benchmarks/plans_speed.py --smoke               # n = 256, every step once (a minute)

For each length n:

1. **Text.** Real text from the corpus: whole articles concatenated (separated by a blank line)
   until n tokens, as one article is shorter than n; the fit text and the held-out text come from
   disjoint articles. The run prints how many articles each sequence spans.
2. **Latency table** at the model's head shapes (query heads, d_head) and n, on this device and
   thread count: each whole-scope method (sink + window, vertical-slash) at each s, as a share of
   SDPA's time (clock.latency_table; Q and K carry a position code, so heads attend near their
   diagonal as most real heads do).
3. **Damage** per head on the fit text: the mean TV over every query of the method's row against
   exact attention (whole_plans.whole_damage).
4. **The plan**: least summed damage at mean time share ≤ the budget (by the table's numbers); and
   **the best single method at equal measured time**: one method and s on every head, of least
   fit damage among those whose time share is at most the plan's.
5. **Timing**: prefill of the whole model (end-to-end) and the time inside attention alone, for
   SDPA, the plan and the single method, interleaved, the median of warm repeats; the plan's
   FlexAttention compiles on its first call, reported apart.
6. **Quality**: held-out perplexity (every position's next token) of exact, the plan and the single
   method.

The ratios printed are measured side by side in this run; nothing is compared across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from eigenattn.config.schema import node  # noqa: E402

# (at n = 256 every method is bound by overhead and costs more than SDPA: budget 1)
SMOKE = "--lengths 256 --subsets 16 64 --threads 1 --repeats 1 --fit-sequences 1 --heldout-sequences 1".split()
SMOKE += ["--budget", "1"]


def articles_to(tokenizer, texts, n: int, count: int, start: int):
    """``count`` sequences of exactly n tokens, each from whole articles concatenated in order from
    ``start``; returns (ids (count, n), the article index after the last one used, articles per sequence)."""
    import torch

    out, spans, i = [], [], start
    for _ in range(count):
        ids, used = [], 0
        while len(ids) < n:
            if i >= len(texts):
                raise SystemExit(f"the corpus ran out of articles at n = {n}; use fewer sequences or a larger corpus")
            ids += tokenizer(texts[i] + "\n\n", add_special_tokens=False)["input_ids"]
            i, used = i + 1, used + 1
        out.append(ids[:n])
        spans.append(used)
    return torch.tensor(out, dtype=torch.long), i, spans


class AttentionTimer:
    """Total wall time inside an attention function (synchronised on CUDA)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.total = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.total += time.perf_counter() - t
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="resources/models/smollm2")
    ap.add_argument("--documents", default="resources/corpora/enwiki-sample/documents.parquet")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="torch CPU threads; 0: all cores")
    ap.add_argument("--budget", type=float, default=0.3, help="the plan's budget, a share of SDPA's time")
    ap.add_argument("--subsets", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--methods", nargs="+", default=["sink_window", "vertical_slash"])
    ap.add_argument("--fit-sequences", type=int, default=1)
    ap.add_argument("--heldout-sequences", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="warm repeats; the median is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eager", action="store_true", help="eager FlexAttention (no torch.compile)")
    ap.add_argument("--sinks", type=int, default=node("reconstruction.peer_sinks")["default"])
    ap.add_argument("--q-last", type=int, default=node("reconstruction.peer_q_last")["default"])
    ap.add_argument("--out", type=Path, help="also write the table as CSV here")
    ap.add_argument("--smoke", action="store_true", help=f"a smoke run: {' '.join(SMOKE)} (overrides those options)")
    a = ap.parse_args(argv)
    if a.smoke:
        a = ap.parse_args([*(sys.argv[1:] if argv is None else argv), *SMOKE])

    import os

    import numpy as np
    import pandas as pd
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from eigenattn.capture.extract import model_facts
    from eigenattn.errors import ConfigError
    from eigenattn.reconstruction import clock, whole_plans
    from eigenattn.reconstruction.partial import detach
    from eigenattn.reconstruction.plan_attention import PLAN_KERNELS_IMPL, apply_plan, register_kernels
    from eigenattn.reconstruction.plans import uniform_plan
    from eigenattn.reconstruction.plugin import sequence_outputs

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    device = torch.device(a.device)
    all_threads = len(os.sched_getaffinity(0))
    docs = pd.read_parquet(a.documents)
    texts = docs["text"].tolist()
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model = model.eval().to(device)
    cfg = model.config
    facts = model_facts(model)
    H, d_head = facts["heads"], facts["head_dim"]
    settings = {"ridge": 0.0, "rank": 0.0, "seed": 0, "q_last": a.q_last, "sinks": a.sinks}
    name = clock.device_name(device)
    mode = "eager" if a.eager else "compiled"
    register_kernels()
    plan_fn = AttentionInterface._global_mapping[PLAN_KERNELS_IMPL]
    rows = []
    print(f"{Path(a.model_dir).name}: {cfg.num_hidden_layers} layers × {H} heads, d_head {d_head}; {name}")
    for n in a.lengths:
        fit, nxt, fit_spans = articles_to(tok, texts, n, a.fit_sequences, 0)
        held, _, held_spans = articles_to(tok, texts, n, a.heldout_sequences, nxt)
        print(f"n = {n}: fit text spans {fit_spans} articles, held-out {held_spans} (whole articles concatenated)")
        fit, held = fit.to(device), held.to(device)
        torch.set_num_threads(all_threads)
        grid = [(m, s) for m in a.methods for s in a.subsets if s < n]
        t = time.perf_counter()
        damage = whole_plans.whole_damage(model, fit, grid, sinks=a.sinks, q_last=a.q_last)
        print(
            f"  damage of {len(grid)} (method, s) on {H * cfg.num_hidden_layers} heads: {time.perf_counter() - t:.0f} s"
        )
        quality = {}
        for threads in a.threads:
            th = threads or all_threads
            torch.set_num_threads(th)
            lat = clock.latency_table(
                [n], sorted({s for _, s in grid}), tuple(a.methods), d_head=d_head, heads=H, threads=th,
                device=a.device, repeats=a.repeats, compiled=not a.eager, sinks=a.sinks, q_last=a.q_last,
                pinv="iterative", seed=0, inputs="local",
            )  # fmt: skip
            cands = whole_plans.candidates(damage, lat, n)
            try:
                plan = whole_plans.whole_plan(
                    cands, a.budget, model=Path(a.model_dir).name, n=n, settings=settings, device=name
                )
            except ConfigError:
                cheapest = lat.groupby("method")["time_share"].min().to_dict()
                print(f"  {th} thread(s): no plan within {a.budget} of SDPA's time (cheapest per method {cheapest})")
                continue
            try:
                method, s, s_cost, _ = whole_plans.best_single(cands, plan.cost_share)
            except ValueError:  # no sparse method is as cheap as the plan: the single method is exact
                method, s, s_cost = "exact", 0, 1.0
            single = uniform_plan(plan, method, "-", s, s_cost)
            mix = pd.Series([h.method if h.method == "exact" else f"{h.method}@{h.s}" for h in plan.heads])
            print(
                f"  {th} thread(s): plan at time budget {a.budget}: table time share {plan.cost_share:.3f}, "
                f"heads {mix.value_counts().to_dict()}; single method at ≤ that time: {method} s={s} ({s_cost:.3f})"
            )

            timers = {}

            def run(kind, x):
                if kind == "sdpa":
                    model.set_attn_implementation("sdpa")
                    timer = AttentionTimer(sdpa_attention_forward, device)
                    AttentionInterface._global_mapping["sdpa"] = timer
                else:
                    apply_plan(model, plan if kind == "plan" else single, kernels=mode)
                    timer = AttentionTimer(plan_fn, device)
                    AttentionInterface._global_mapping[PLAN_KERNELS_IMPL] = timer
                try:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        model(input_ids=x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return time.perf_counter() - t0, timer.total
                finally:
                    AttentionInterface._global_mapping["sdpa"] = sdpa_attention_forward
                    AttentionInterface._global_mapping[PLAN_KERNELS_IMPL] = plan_fn
                    detach(model)

            kinds = ("sdpa", "plan", "single")
            compile_s = {}
            x = held[:1]
            for kind in kinds:  # warm-up: the first call of each compiles its FlexAttention
                first, _ = run(kind, x)
                compile_s[kind] = first
            for kind in kinds:
                timers[kind] = []
            for _ in range(a.repeats):  # interleaved, so machine noise hits all three alike
                for kind in kinds:
                    timers[kind].append(run(kind, x))
            med = {
                k: (statistics.median(e for e, _ in v), statistics.median(at for _, at in v)) for k, v in timers.items()
            }
            # quality depends on the plan and the single method, not on the threads: measured once per pair
            key = (tuple((h.layer, h.head, h.method, h.s) for h in plan.heads), method, s)
            if key not in quality:
                quality[key] = {}
                for kind in kinds:
                    if kind == "sdpa":
                        model.set_attn_implementation("sdpa")
                        nll = sequence_outputs(model, held, True, 0, 1)  # every position's next token
                    else:
                        apply_plan(
                            model, plan if kind == "plan" else single, kernels="eager" if a.eager else "compiled"
                        )
                        nll = sequence_outputs(model, held, True, 0, 1)  # every position's next token
                        detach(model)
                    quality[key][kind] = float(np.exp(nll.mean()))
                model.set_attn_implementation("sdpa")
            ppl = quality[key]
            (e_sdpa, at_sdpa), (e_plan, at_plan), (e_one, at_one) = med["sdpa"], med["plan"], med["single"]
            row = {
                "n": n,
                "threads": th,
                "device": name,
                "torch_version": torch.__version__,
                "budget": a.budget,
                "plan_table_share": plan.cost_share,
                "single": f"{method}@{s}",
                "single_table_share": s_cost,
                "sdpa_e2e_s": e_sdpa,
                "plan_e2e_s": e_plan,
                "single_e2e_s": e_one,
                "e2e_speedup": e_sdpa / e_plan,
                "sdpa_attn_s": at_sdpa,
                "plan_attn_s": at_plan,
                "single_attn_s": at_one,
                "plan_attn_share": at_plan / at_sdpa,
                "single_attn_share": at_one / at_sdpa,
                "plan_compile_s": max(compile_s["plan"] - e_plan, 0.0),
                "ppl_exact": ppl["sdpa"],
                "ppl_plan": ppl["plan"],
                "ppl_single": ppl["single"],
            }
            rows.append(row)
            print(
                f"  {th} thread(s): attention plan/SDPA = {row['plan_attn_share']:.3f} "
                f"(single {row['single_attn_share']:.3f}); end-to-end SDPA/plan = {row['e2e_speedup']:.2f}x "
                f"({e_sdpa:.2f} s vs {e_plan:.2f} s); perplexity exact {row['ppl_exact']:.3f}, "
                f"plan {row['ppl_plan']:.3f}, single {row['ppl_single']:.3f}; compile {row['plan_compile_s']:.1f} s"
            )
    table = pd.DataFrame(rows)
    if table.empty:
        print(f"plans speed: no plan within {a.budget} of SDPA's time at any length measured (see above)")
        return
    if a.out:
        table.to_csv(a.out, index=False)
    cols = [
        "n",
        "threads",
        "plan_attn_share",
        "single_attn_share",
        "e2e_speedup",
        "ppl_exact",
        "ppl_plan",
        "ppl_single",
    ]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    last = table.iloc[-1]
    print(f"plans speed: n = {int(last.n)}, {int(last.threads)} thread(s): end-to-end {last.e2e_speedup:.2f}x")


if __name__ == "__main__":
    main()
