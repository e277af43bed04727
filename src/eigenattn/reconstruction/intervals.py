"""Intervals over held-out text whose independent unit is the **document** (docs/method.md §9).

Passages of one article share topic, names and style, so their errors are correlated: a Student-t
interval over sequences counts one article's passages as independent draws and is too narrow
(``tests/test_intervals.py`` measures it at about 88% coverage for a nominal 95% at the default's
sizes, 16 sequences from 9 documents with a within-document correlation of 0.5). Every in-model
interval (C3's plug-in rows, C5) is therefore computed here on **per-document means**: the
per-sequence values (paired differences where the data are paired) are averaged within each
document, and Student's t runs over the J document means with J − 1 degrees of freedom. The
estimate is the mean of the document means (each document weighs the same, however many of its
passages were drawn). Without document labels every sequence is its own document, which is the
per-sequence interval.

The plug-in and the plans take their held-out passages spread over documents
(:func:`spread_over_documents`): one passage of every document first, then a second of each, and
so on, so that a fixed number of sequences rests on as many documents as the split holds.

:func:`holm` adjusts a family of p-values (the C5 rows of one model) by Holm's step-down method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

LEVEL = 0.95


@dataclass(frozen=True)
class DocumentInterval:
    """A mean over documents with its two-sided Student-t interval and two-sided p (H0: mean 0)."""

    estimate: float
    low: float
    high: float
    p: float
    n_documents: int
    n_sequences: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def document_means(values, documents=None) -> np.ndarray:
    """The mean of ``values`` within each document, in order of first appearance (``documents``
    None: every value is its own document)."""
    v = np.asarray(values, dtype=np.float64)
    if documents is None:
        return v.copy()
    docs = np.asarray(documents)
    if docs.shape != v.shape:
        raise ValueError(f"{len(docs)} document labels for {len(v)} values")
    _, first, inverse = np.unique(docs, return_index=True, return_inverse=True)
    sums = np.bincount(inverse, weights=v)
    counts = np.bincount(inverse)
    order = np.argsort(first, kind="stable")
    return (sums / counts)[order]


def document_interval(values, documents=None, level: float = LEVEL) -> DocumentInterval:
    """Student-t interval of the mean of ``values`` with documents as the unit (module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    m = document_means(v, documents)
    J = len(m)
    est = float(m.mean()) if J else math.nan
    if J < 2:
        return DocumentInterval(est, -math.inf, math.inf, math.nan, J, len(v))
    se = float(m.std(ddof=1) / math.sqrt(J))
    if se == 0:  # every document agrees exactly: the interval is the point
        return DocumentInterval(est, est, est, 1.0 if est == 0 else 0.0, J, len(v))
    q = float(sps.t.ppf(0.5 + level / 2, J - 1))
    p = float(2 * sps.t.sf(abs(est) / se, J - 1))
    return DocumentInterval(est, est - q * se, est + q * se, p, J, len(v))


def paired_interval(better, worse, documents=None, level: float = LEVEL) -> DocumentInterval:
    """The interval of ``better − worse`` (positive: the first is better), paired per sequence and
    resampled by document."""
    d = np.asarray(better, dtype=np.float64) - np.asarray(worse, dtype=np.float64)
    return document_interval(d, documents, level)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def spread_over_documents(documents, n: int | None) -> np.ndarray:
    """Indices (ascending) of ``n`` items spread over documents: the first item of every document
    (in order of first appearance), then the second of each, and so on. ``n`` None or at least the
    number of items: every index."""
    docs = np.asarray(documents)
    N = len(docs)
    if not n or n >= N:
        return np.arange(N)
    _, first, inverse = np.unique(docs, return_index=True, return_inverse=True)
    doc_order = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inverse]  # rank of each item's document
    rank = np.zeros(N, dtype=int)  # how many earlier items share the item's document
    seen: dict = {}
    for i, d in enumerate(inverse):
        rank[i] = seen.get(d, 0)
        seen[d] = rank[i] + 1
    pick = np.lexsort((doc_order, rank))[:n]
    return np.sort(pick)


def sequences_path(table_path) -> Path:
    """The per-sequence values written beside a plug-in table (``results/plugin/{model}.csv`` ->
    ``results/plugin/{model}.sequences.csv``, one output of the same job), which the plug-in claims
    resample by document."""
    p = Path(table_path)
    return p.with_name(p.stem + ".sequences.csv")
