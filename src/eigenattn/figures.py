"""Helpers shared by the notebooks: saving figures and loading pipeline outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from eigenattn.claims.verdicts import iqr  # noqa: F401  (the notebooks read it from here)
from eigenattn.reconstruction.cost import family

if TYPE_CHECKING:
    import pandas as pd

METHOD_COLORS = {
    "conditional_gaussian": "C0",
    "eigenspace": "C1",
    "mean": "C2",
    "subset_only": "C3",
    "exact": "k",
    "partial_fixed": "C0",
    "partial_learned": "C4",
    "linformer": "C1",
    "nystrom": "C5",
    "vertical_slash": "C6",
    "sink_window": "C8",
    "topk_oracle": "0.45",
    "uniform": "C9",
}
STRATEGY_STYLES = {"pivoted_qr": "-", "strided": "--", "random": ":", "-": "-", "exact": ":", "iterative": "-"}


def pareto_front(cost, error) -> list[int]:
    """Indices of the points no other point beats on both cost and error (lower is better), by cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], error[i]))
    front, best = [], float("inf")
    for i in order:
        if error[i] < best:
            front.append(i)
            best = error[i]
    return front


def frontier_table(df: "pd.DataFrame", value: str) -> "pd.DataFrame":
    """Median ``value`` over heads (or the single plug-in value) per method and s, with its cost
    share and family: the points of a frontier figure."""
    keys = [c for c in ("model", "view", "estimator", "strategy", "subset_size") if c in df.columns]
    out = df.groupby(keys, dropna=False).agg(value=(value, "median"), cost_share=("cost_share", "first"))
    out = out.reset_index()
    out["family"] = [family(e) for e in out.estimator]
    return out


def setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 130,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "svg.hashsalt": "eigenattn",
            "font.size": 9,
        }
    )
    return plt


def save(fig, fig_dir, name: str) -> list[Path]:
    """Write ``name``.png and ``name``.svg under ``fig_dir``; refuse a figure whose axes hold no data."""
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        if not (ax.lines or ax.collections or ax.images or ax.patches or ax.tables or ax.texts):
            raise ValueError(f"figure '{name}': an axes holds no data ({ax.get_title()!r})")
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "svg"):
        p = fig_dir / f"{name}.{ext}"
        fig.savefig(p, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        out.append(p)
    return out


def write_manifest(fig_dir, entries: dict[str, str]) -> None:
    """figures.json: figure name -> one-line description of what it shows."""
    Path(fig_dir).mkdir(parents=True, exist_ok=True)
    (Path(fig_dir) / "figures.json").write_text(json.dumps(entries, indent=2))


def number(value) -> float:
    """A claims-table value as a float: NaN where the table (read with ``keep_default_na=False``)
    holds an empty cell, a row whose number is undefined."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def claim_grid(table) -> "pd.DataFrame":
    """The one-glance summary of the claims table: one cell per claim (C4 per mode) and subject
    (model / view for C1–C3, variant and s for C4), with the state that answers it and its number.

    A cell's state is its headline row's where it has one (C1), else the common state of its judged
    rows, else ``mixed``; reference-only cells are ``reference``. The number is the headline's value,
    else the first judged row's (row-centred rows first). ``rows`` counts the rows behind the cell.
    """
    import pandas as pd

    t = table.copy()
    t["row_label"] = [f"{r.claim} {r.mode}".strip() if r.claim == "C4" else r.claim for r in t.itertuples()]
    t["subject"] = [
        f"{r.model} s={r.s}"
        if r.claim == "C4" and str(r.s) not in ("", "<NA>", "nan")
        else (r.model if r.claim == "C4" else f"{r.model} / {r.view}")
        for r in t.itertuples()
    ]
    out = []
    for (label, subject), g in t.groupby(["row_label", "subject"], sort=False):
        judged = g[g.state != "reference"]
        head = g[g.role == "headline"]
        if len(head):
            pick, state = head.iloc[0], head.iloc[0].state
        elif not len(judged):
            pick, state = g.iloc[0], "reference"
        else:
            order = judged.assign(_c=(judged.variant != "row_centered").astype(int)).sort_values("_c", kind="stable")
            pick = order.iloc[0]
            state = judged.state.iloc[0] if judged.state.nunique() == 1 else "mixed"
        counts = judged.state.value_counts()
        out.append(
            {
                "row": label,
                "subject": subject,
                "state": state,
                "value": number(pick.value),
                "quantity": pick.quantity,
                "rows": len(g),
                "tally": ", ".join(f"{n} {s}" for s, n in counts.items()),
            }
        )
    return pd.DataFrame(out)


def layer_curves(curves: "pd.DataFrame", column: str = "cumulative") -> "pd.DataFrame":
    """The per-input spectrum of one model and view (per_input.csv) per layer: for each layer and
    index j, the median over the layer's heads of ``column`` and its quartiles (``q25``, ``q75``)."""
    g = curves.groupby(["layer", "index"], sort=True)[column]
    out = g.quantile([0.25, 0.5, 0.75]).unstack()
    out.columns = ["q25", "median", "q75"]
    return out.reset_index()


def head_grid(summary: "pd.DataFrame", column: str = "value_at_quarter"):
    """(layers, grid) of one model and view's per_input_summary.csv: ``grid[i, h]`` is ``column`` of
    the i-th layer (in ``layers``, ascending) and head h."""
    wide = summary.pivot(index="layer", columns="head", values=column).sort_index()
    return list(wide.index), wide.to_numpy(dtype=float)
