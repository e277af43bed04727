"""Apply a per-head plan from a finished run to its model, and compare it with the plain model.

Run it in the working directory of a finished run (results/ and resources/ beside each other):

    python examples/apply_plan.py                       # smollm2, the plan with the lowest budget
    python examples/apply_plan.py --model smollm2 --plan results/plans/smollm2/plans/tv-0.3.json

It loads the plan's model on the ``partial`` attention backend, takes a few held-out passages of the
run, tokenises each to exactly the plan's ``seq_len`` tokens (the only length a plan runs at), and
prints the perplexity of the plain model and of the planned one on the targets that the plan's view
covers (its queries; the tokens before them run exact attention either way), then the plain
model's again once the plan is removed. For an encoder (no language-model head) it prints the cosine
between the planned and the plain mean-pooled embeddings instead.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer

from eigenattn.corpus.passages import tokenize_passages
from eigenattn.reconstruction.partial import detach
from eigenattn.reconstruction.plan_attention import apply_plan, load_for_plans
from eigenattn.reconstruction.plans import read_plan


def pick_plan(model: str) -> Path:
    """The run's plan of ``model`` with the lowest budget (the one that approximates the most)."""
    plans = sorted(Path("results/plans", model, "plans").glob("*.json"))
    if not plans:
        sys.exit(f"no plan files under results/plans/{model}/plans: run the workflow (with plans.budgets) first")
    return min(plans, key=lambda p: (float(re.sub(r"^.*-", "", p.stem)), p.name))


def heldout_passages(count: int) -> list[str]:
    """The first held-out passages of the run (results/corpus/<corpus>/passages.parquet)."""
    found = sorted(Path("results/corpus").glob("*/passages.parquet"))
    if not found:
        sys.exit("no results/corpus/*/passages.parquet: run this in the working directory of a finished run")
    passages = pd.read_parquet(found[0])
    return list(passages[passages["split"] == "heldout"]["text"][:count])


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, q0: int) -> float:
    """exp(mean NLL) of the tokens predicted from the queries at positions q0 and after."""
    logits = model(input_ids=ids).logits[:, q0:-1].float()
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, ids[:, q0 + 1 :, None])
    return math.exp(float(nll.mean()))


@torch.inference_mode()
def pooled(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state.float().mean(dim=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="the run model whose plan is applied (default: smollm2)")
    ap.add_argument("--plan", type=Path, help="a plan file (default: the model's plan with the lowest budget)")
    ap.add_argument("--passages", type=int, default=4, help="held-out passages to compare on (default: 4)")
    args = ap.parse_args(argv)

    plan_file = args.plan or pick_plan(args.model)
    plan = read_plan(plan_file)
    model_dir = Path("resources/models", plan.model)
    model = load_for_plans(model_dir, plan.causal)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.from_numpy(tokenize_passages(tokenizer, heldout_passages(args.passages), plan.seq_len).astype(np.int64))
    print(f"plan {plan_file}: {plan.model}, view {plan.view}, n = {plan.seq_len}, cost share {plan.cost_share:.3f}")
    print(f"{len(ids)} held-out passages of exactly {ids.shape[1]} tokens")

    # the paper estimators and baselines refit their maps from the fit split's row statistics
    rows = Path("results/eigen", plan.model, plan.view, "rows.zarr")
    q0 = int(plan.query_range[0])
    if plan.causal:
        plain = perplexity(model, ids, q0)
        apply_plan(model, plan, rows_store=rows if rows.exists() else None)
        planned = perplexity(model, ids, q0)
        detach(model)
        again = perplexity(model, ids, q0)
        print(f"perplexity of the plain model: {plain:.4f}")
        print(f"perplexity with the plan:      {planned:.4f} ({planned / plain - 1:+.2%})")
        print(f"perplexity after detach:       {again:.4f}")
    else:
        plain = pooled(model, ids)
        apply_plan(model, plan, rows_store=rows if rows.exists() else None)
        cos = torch.nn.functional.cosine_similarity(pooled(model, ids), plain, dim=-1)
        detach(model)
        print(f"embedding cosine, planned against plain: mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}")


if __name__ == "__main__":
    main()
