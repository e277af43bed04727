"""C5, beyond the paper (docs/method.md §13): "a per-head plan beats the best single method at equal
cost", one row per model, budget and damage, from the plans job's summary.

The comparator is every single method of the plan's own candidate grid run in the whole model at
the largest s whose cost is at most the plan's budget (which the plan's own cost is at most too),
the best of them chosen on the **fit** split
(:func:`eigenattn.reconstruction.plan_eval.best_single`); its cost as a share of the plan's is
``single_cost_ratio`` (it can exceed 1 by the plan's unspent budget, which only makes the claim
harder), and that of the dearest single method the grid holds within the budget is
``grid_cost_ratio``. The comparison is paired per held-out sequence and resampled by
**document** (the independent unit, docs/method.md §9): per sequence, the single method's mean NLL
minus the plan's (causal), or the plan's embedding cosine minus the single method's (encoder),
averaged within each document; Student's t over the documents (J − 1 degrees of freedom). Positive
means the plan is better. The rows of one model are one family: their p-values are adjusted by
Holm's method (``p_holm``).

- supported: the interval's lower end is above 0, Holm's adjusted p is below ``ALPHA``, and the
  grid allows an equal-cost comparison (``grid_cost_ratio`` ≥ ``EQUAL_COST``: some single method
  within 10% of the plan's cost was a candidate; the comparator may be cheaper when it did better
  on the fit split);
- not supported: the interval's upper end is at or below 0 (the plan, costing at least as much,
  is no better: for example the plan *is* the single method, when one method is best for every
  head);
- inconclusive: anything else: the interval contains 0 with room above it; the plan wins but not
  after Holm's adjustment; the plan wins but the plan's grid has no single method within
  ``EQUAL_COST`` of its cost, so a win may be bought with the extra cost; or no single method
  fits within the plan's budget.

Each row also states the share of the gap between the single method and exact that the plan
recovers (undefined, with the reason, when the single method is within noise of exact), and the
number of documents it rests on.
"""

from __future__ import annotations

import math

import pandas as pd

from eigenattn.claims.verdicts import make_row
from eigenattn.reconstruction.cost import OVERHEAD_N
from eigenattn.reconstruction.intervals import holm

ALPHA = 0.05
EQUAL_COST = 0.9


def _num(r, name, default=math.nan) -> float:
    v = getattr(r, name, default)
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _family_p(df: pd.DataFrame) -> pd.Series:
    """Holm-adjusted p of each row, over the judged rows of each model (the summary's own ``p_holm``
    where it has one)."""
    if "p_holm" in df and df["p_holm"].notna().any():
        return df["p_holm"].astype(float)
    if "p_value" not in df:
        return pd.Series(math.nan, index=df.index)
    out = pd.Series(math.nan, index=df.index)
    for _, g in df.groupby("model"):
        out.loc[g.index] = holm(g["p_value"].astype(float).to_numpy())
    return out


def c5_state(
    low: float, high: float, p_holm: float, grid_ratio: float, family: int, n_documents: float = math.nan
) -> tuple[str, str]:
    """(state, verdict) of one C5 row (the module docstring's rules). ``grid_ratio``: the cost of the
    dearest single method of the plan's grid within its budget, as a share of the plan's cost."""
    if high <= 0:
        return "not supported", "the plan is no better than the best single method within its budget"
    if not low > 0:
        if not math.isfinite(low):
            return "inconclusive", "too few held-out documents to decide (an interval needs at least two)"
        docs = f" of {int(n_documents)} documents" if math.isfinite(n_documents) else ""
        return "inconclusive", (
            f"the paired interval over the held-out documents{docs} contains no difference; more held-out "
            "documents (sampling.n_sequences.heldout, plugin.n_sequences, a larger corpus) would narrow it"
        )
    if not grid_ratio >= EQUAL_COST:
        return "inconclusive", (
            f"the plan beats the best single method, but no single method of the plan's grid costs within "
            f"{EQUAL_COST:.0%} of the plan (the dearest: {grid_ratio:.3f} of it), so this is not an equal-cost "
            "comparison"
        )
    if not p_holm < ALPHA:
        return "inconclusive", (
            f"the interval excludes 0, but not after Holm's adjustment over the model's {family} C5 rows "
            f"(adjusted p = {p_holm:.2g})"
        )
    return "supported", "the plan beats the best single method at equal cost"


def c5_rows(summaries) -> list[dict]:
    rows = []
    for path in summaries:
        df = pd.read_csv(path)
        adjusted = _family_p(df)
        family = int(df["p_value"].notna().sum()) if "p_value" in df else len(df)
        for i, r in zip(df.index, df.itertuples()):
            axis = getattr(r, "cost_axis", "macs")
            axis = axis if isinstance(axis, str) else "macs"
            unit = "of exact attention MACs" if axis == "macs" else "of SDPA's measured time"
            scope = getattr(r, "scope", "view")
            common = {
                "model": r.model,
                "view": f"plug-in ({r.view})" if scope != "whole" else "whole (every query)",
                "method": f"plan:{r.damage}",
                "scope": f"budget {r.budget:g} {unit}; plan costs {r.cost_share:.3f}"
                if not pd.isna(r.cost_share)
                else f"budget {r.budget:g} {unit}",
                "quantity": (
                    "paired Δ mean NLL per document (single − plan)"
                    if r.metric == "perplexity"
                    else "paired Δ embedding cosine per document (plan − single)"
                ),
            }
            n_docs = _num(r, "n_documents")
            common["n_documents"] = int(n_docs) if math.isfinite(n_docs) else None
            note, single = getattr(r, "note", None), getattr(r, "single_method", None)
            note = note if isinstance(note, str) else ""
            unjudged = None
            if note and pd.isna(r.plan_value):
                unjudged = note
            elif single is None or (isinstance(single, float) and math.isnan(single)):
                unjudged = (
                    "no single method of the plan's candidate grid fits within the plan's budget: none to compare"
                )
            if unjudged is not None:
                n = _num(r, "seq_len")
                state = "reference" if axis == "time" and math.isfinite(n) and n < OVERHEAD_N else "inconclusive"
                row = {"value": float("nan"), "spread": "", "state": state, "verdict": unjudged}
                rows.append(make_row("C5", path, **common, **row, caveat=""))
                continue
            low, high = float(r.paired_low), float(r.paired_high)
            ratio = _num(r, "single_cost_ratio")
            if not math.isfinite(ratio):  # an older summary: the ratio from its two costs
                ratio = float(r.single_cost_share) / float(r.cost_share)
            grid_ratio = _num(r, "grid_cost_ratio", ratio)
            grid_ratio = grid_ratio if math.isfinite(grid_ratio) else ratio
            p_holm = float(adjusted.loc[i])
            state, verdict = c5_state(low, high, p_holm, grid_ratio, family, n_docs)
            n = _num(r, "seq_len")
            if axis == "time" and math.isfinite(n) and n < OVERHEAD_N:
                state = "reference"
                verdict = (
                    f"priced by measured time at n = {int(n)}, where every kernel is bound by call overhead "
                    f"(below {OVERHEAD_N}): a reference, not a verdict; on its numbers: {verdict}"
                )
            gap = _num(r, "gap_recovered")
            gap_text = f"{gap:.0%} of the gap to exact recovered" if math.isfinite(gap) else "gap recovered undefined"
            verdict += (
                f"; vs {r.single_method}/{r.single_strategy} s={int(r.single_s)} (cost {r.single_cost_share:.3f}, "
                f"{ratio:.2f} of the plan's; chosen on the fit split): {r.metric} {r.plan_value:.4f} against "
                f"{r.single_value:.4f} (exact {r.exact_value:.4f}), {gap_text}"
            )
            docs = f"{int(n_docs)} documents" if math.isfinite(n_docs) else f"{int(r.n_sequences)} sequences"
            caveats = [
                "plans chosen on fit-split TV per head (in-sample for the paper estimators' fitted maps); the "
                "comparator is the best on fit passages of every single method at the largest s of the plan's "
                "grid within its cost"
            ]
            if note:
                caveats.append(note)
            rows.append(
                make_row(
                    "C5",
                    path,
                    **common,
                    value=float(r.paired_diff),
                    spread=(
                        f"95% CI {low:+.4f}…{high:+.4f} over {docs} ({int(r.n_sequences)} sequences); "
                        f"Holm-adjusted p {p_holm:.2g} over {family} rows"
                    ),
                    state=state,
                    verdict=verdict,
                    caveat="; ".join(caveats),
                )
            )
    return rows
