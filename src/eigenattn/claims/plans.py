"""C5, beyond the paper (docs/method.md §13): "a per-head plan beats the best single method at equal
cost", one row per model, budget and damage, from the plans job's summary.

The comparison is paired over held-out sequences (the independent unit): per sequence, the single
method's mean NLL minus the plan's (causal), or the plan's embedding cosine minus the single
method's (encoder); positive means the plan is better. Student-t 95% interval over sequences.

- supported: the interval's lower end is above 0;
- not supported: its upper end is at or below 0 (the plan is no better: for example the plan *is*
  the single method, when one method is best for every head);
- inconclusive: the interval contains 0 with room above it, or no single method costs as little
  as the plan (nothing to compare at equal cost).

Each row also states the share of the gap between the single method and exact that the plan
recovers.
"""

from __future__ import annotations

import math

import pandas as pd

from eigenattn.claims.verdicts import make_row


def c5_rows(summaries) -> list[dict]:
    rows = []
    for path in summaries:
        df = pd.read_csv(path)
        for r in df.itertuples():
            common = {
                "model": r.model,
                "view": f"plug-in ({r.view})",
                "method": f"plan:{r.damage}",
                "scope": f"budget {r.budget:g} of exact attention MACs; plan costs {r.cost_share:.3f}"
                if not pd.isna(r.cost_share)
                else f"budget {r.budget:g} of exact attention MACs",
                "quantity": (
                    "paired Δ mean NLL per sequence (single − plan)"
                    if r.metric == "perplexity"
                    else "paired Δ embedding cosine per sequence (plan − single)"
                ),
            }
            note, single = getattr(r, "note", None), getattr(r, "single_method", None)
            unjudged = None
            if isinstance(note, str) and note and pd.isna(r.plan_value):
                unjudged = note
            elif single is None or (isinstance(single, float) and math.isnan(single)):
                unjudged = "no single method of the plug-in costs as little as the plan, so none can be compared"
            if unjudged is not None:
                row = {"value": float("nan"), "spread": "", "state": "inconclusive", "verdict": unjudged}
                rows.append(make_row("C5", path, **common, **row, caveat=""))
                continue
            low, high = float(r.paired_low), float(r.paired_high)
            if low > 0:
                state, verdict = "supported", "the plan beats the best single method at ≤ its cost"
            elif high <= 0:
                state, verdict = "not supported", "the plan is no better than the best single method at ≤ its cost"
            else:
                state, verdict = "inconclusive", "the paired interval contains no difference"
            gap = float(r.gap_recovered)
            verdict += (
                f"; vs {r.single_method}/{r.single_strategy} s={int(r.single_s)} "
                f"(cost {r.single_cost_share:.3f}): {r.metric} {r.plan_value:.4f} against {r.single_value:.4f} "
                f"(exact {r.exact_value:.4f}), {gap:.0%} of the gap to exact recovered"
            )
            rows.append(
                make_row(
                    "C5",
                    path,
                    **common,
                    value=float(r.paired_diff),
                    spread=f"95% CI {low:+.4f}…{high:+.4f} over {int(r.n_sequences)} sequences",
                    state=state,
                    verdict=verdict,
                    caveat=(
                        "chosen on fit-split TV per head (in-sample for the paper estimators' fitted maps); the "
                        "single method is the plug-in's best at ≤ the plan's cost on the same held-out sequences, "
                        "on the plug-in's s grid (favours the single method)"
                    ),
                )
            )
    return rows
