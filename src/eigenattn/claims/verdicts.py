"""What every row of the claims table shares: its columns, the states a verdict can take, the
default thresholds (the ``claims:`` config section) and the caveats of the row analyses."""

from __future__ import annotations

import numpy as np

COLUMNS = [
    "claim",
    "model",
    "view",
    "variant",
    "k",
    "s",
    "mode",
    "method",
    "scope",
    "quantity",
    "value",
    "spread",
    "n_documents",
    "state",
    "role",
    "verdict",
    "caveat",
    "source",
]
STATES = ("supported", "not supported", "inconclusive", "reference")
DEFAULTS = {
    "k_report": 16,
    "s_report": 16,
    "c1_max_k90_share": 0.5,
    "c2_min_ratio_random": 2.0,
    "c3_min_gain": 0.05,
    "c3_alpha": 0.05,
    "c4_min_kept_gain": 0.5,
}
BASELINES = ("mean", "subset_only")

CAVEAT_RAW = (
    "raw rows keep each row's own offset, which softmax ignores; its constant direction can dominate "
    "(median |<u1, 1/sqrt(d)>| = {u1:.2f}); see row_centered"
)
CAVEAT_PREFIX_CENTERED = (
    "prefix view: rows also have keys outside the view, so row centring removes a "
    "softmax-invariant offset only approximately"
)
CAVEAT_CROSS = (
    "keys are compared by position, but the two models tokenise the same passages differently, "
    "so key j is not the same token in both"
)


ROLES = ("headline", "supporting", "")


def make_row(claim, source, **kw) -> dict:
    """A claims row; ``role`` is "headline" for the row that answers its claim for a model and view,
    "supporting" for the other rows of that model and view (C1), and empty where every row answers
    for its own scope. ``n_documents``: how many held-out documents an in-model interval rests on
    (C3's plug-in rows, C5; empty elsewhere). Keys starting with an underscore are bookkeeping, not
    columns."""
    return {"claim": claim, "source": str(source), "role": "", **kw}


def caveat_rows(variant: str, view: str, u1: float | None = None) -> str:
    parts = []
    if variant == "raw" and u1 is not None:
        parts.append(CAVEAT_RAW.format(u1=u1))
    if variant == "row_centered" and view == "prefix":
        parts.append(CAVEAT_PREFIX_CENTERED)
    return "; ".join(parts)


def nearest_measured(values, want: int) -> int:
    """``want`` if measured, else the largest measured value below it (else the smallest)."""
    values = sorted(set(int(x) for x in values))
    below = [x for x in values if x <= want]
    return below[-1] if below else values[0]


def iqr(x) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles of the finite values (NaN if there are none)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return (np.nan, np.nan, np.nan)
    return tuple(float(v) for v in np.percentile(x, [25, 50, 75]))
