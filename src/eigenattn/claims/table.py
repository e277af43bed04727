"""The claims table (docs/method.md §9), computed from the pipeline's CSV outputs.

Every row states a measured value, its spread, a ``state`` (supported, not supported,
inconclusive, or reference for rows that only set a baseline), a verdict in words, and the caveat
that qualifies it. Each state can come out either way: a value that cannot answer its question
(bounded by the sample count, noise-level subspaces, an exact model that has not learned, an
interval too wide) is ``inconclusive`` rather than read as support. The thresholds are the
``claims:`` section of the config (see :data:`DEFAULTS`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from eigenattn.claims.plans import c5_rows
from eigenattn.claims.reconstruction import c3_rows, c4_rows
from eigenattn.claims.spectra import c1_headlines, c1_per_input_rows, c1_rows, c1_scaling_rows, c2_rows
from eigenattn.claims.verdicts import COLUMNS, DEFAULTS, STATES
from eigenattn.config.settings import ClaimThresholds

__all__ = [
    "COLUMNS",
    "DEFAULTS",
    "STATES",
    "c1_per_input_rows",
    "c1_rows",
    "c1_scaling_rows",
    "c2_rows",
    "c3_rows",
    "c4_rows",
    "c5_rows",
    "claims_table",
]


def claims_table(
    spectra,
    overlap_summary,
    recon,
    plugin,
    training,
    thresholds: ClaimThresholds | None = None,
    scaling: tuple = ((), (), ()),
    per_input=(),
    plans=(),
    latency=(),
) -> pd.DataFrame:
    """``scaling``: (fits, saturations, tables) of the scaling study, one of each per model and view;
    ``per_input``: the per-input spectrum's summaries (per_input_summary.csv, one per model and
    view), each a C1 reference row; ``plans``: the plans jobs' summaries (C5 rows, beyond the paper);
    ``latency``: the views' latency tables (C3's rows on the time axis); ``thresholds``: the claims
    section (:data:`DEFAULTS` when not
    given); ``training``: the training comparisons, or None when nothing was trained (no C4 rows)."""
    t = ClaimThresholds.from_params(DEFAULTS) if thresholds is None else thresholds
    c1 = c1_headlines(c1_rows(spectra, t) + c1_scaling_rows(*scaling, t))
    rows = (
        c1
        + c1_per_input_rows(per_input, c1)
        + c2_rows(overlap_summary, t)
        + c3_rows(recon, plugin, t, latency)
        + (c4_rows(training, t) if training is not None else [])
        + c5_rows(plans)
    )
    df = pd.DataFrame.from_records(rows, columns=COLUMNS)
    for col in ("k", "s"):
        df[col] = df[col].astype("Int64")
    df["source"] = [str(Path(p)) for p in df.source]
    return df
