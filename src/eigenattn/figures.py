"""Helpers shared by the notebooks: saving figures and loading pipeline outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METHOD_COLORS = {"conditional_gaussian": "C0", "eigenspace": "C1", "mean": "C2", "subset_only": "C3",
                 "exact": "k", "partial_fixed": "C0", "partial_learned": "C4", "linformer": "C1"}


def setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 130, "axes.grid": True, "grid.alpha": 0.3,
                         "svg.hashsalt": "eigenattn", "font.size": 9})
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


def iqr(x) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return (np.nan, np.nan, np.nan)
    return tuple(float(v) for v in np.percentile(x, [25, 50, 75]))
