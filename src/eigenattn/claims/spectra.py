"""C1 and C2 of the claims table: how low-dimensional score rows and view blocks are (from the
spectra and the scaling study), and how much heads share their subspaces (from the overlap summary)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from eigenattn.claims.verdicts import CAVEAT_CROSS, caveat_rows, iqr, make_row, nearest_measured
from eigenattn.config.settings import ClaimThresholds

# --------------------------------------------------------------------------------------------- C1
#
# One headline row per model and view answers C1: the median k90/d of row-centred score rows at the
# longest length the run measures (the length sweep's last n, else the main run's). Every other C1
# row of that model and view (the other variant, shorter lengths, the trend α, whole view blocks) is
# a supporting row; where its state differs from the headline's, its verdict says so and why.

HEADLINE_VARIANT = "row_centered"


def _level_state(q50: float, bounded: float, share: float, more: str = "", dim: str = "d") -> tuple[str, str]:
    """State and verdict of a median k90 as a share of the dimension ``dim`` (d for rows, D for whole
    blocks); ``bounded``: the share of heads bounded by N, ``more``: what would answer if so."""
    if bounded > 0.5:
        return "inconclusive", f"k90 is only a lower bound for most heads (bounded by the sample count); {more}"
    if q50 < share:
        return "supported", f"low-dimensional: median k90 < {share:g}·{dim}"
    return "not supported", f"not low-dimensional: median k90 ≥ {share:g}·{dim}"


def c1_rows(spectra, thresholds: ClaimThresholds) -> list[dict]:
    """k90 of score rows (share of d) and of whole view blocks at the main run's length, per model,
    view and variant. Whole blocks bounded by the sample count are a reference row naming the N
    they would need: at the main run's n their dimension D = d·(rows of the view) exceeds any N the
    corpus sample holds, and the sample sweep (:func:`c1_scaling_rows`) answers for whole blocks."""
    out = []
    share = thresholds.c1_max_k90_share
    for p in spectra:
        sp = pd.read_csv(p)
        heads = sp[sp["head"] != "pooled"]
        if not (heads.analysis == "full").any():
            out.append(_streamed_full_row(heads, p))
        for (analysis, v), x in heads.groupby(["analysis", "variant"], sort=False):
            model, view, d, N = x.model.iloc[0], x.view.iloc[0], int(x.d.iloc[0]), int(x.n_samples.iloc[0])
            bounded = float(x.bounded_k90.mean())
            q25, q50, q75 = iqr(x.k90 / x.d)
            base = dict(
                model=model,
                view=view,
                variant=v,
                source=p,
                _analysis=analysis,
                caveat=caveat_rows(v, view, float(x.u1_constant.median()) if analysis == "rows" else None),
            )
            if analysis == "rows":
                n = d if view == "all" else 2 * d  # the sequence length (docs/method.md §3: views)
                state, verdict = _level_state(
                    q50, bounded, share, "more fit sequences are needed (raise sampling.n_sequences.fit)"
                )
                out.append(
                    make_row(
                        "C1",
                        **base,
                        _n=n,
                        scope=f"rows (d={d}, {len(x)} heads)",
                        quantity="median k90/d over heads",
                        value=q50,
                        spread=f"IQR {q25:.2f}–{q75:.2f}",
                        state=state,
                        verdict=verdict,
                    )
                )
                continue
            k = float(x.k90.median())
            row = dict(
                scope=f"full matrices (dim {d}, N={N}, {len(x)} heads)",
                quantity=f"median k90 over heads (rank at most N−1 = {N - 1})",
                value=k,
                spread=f"IQR {x.k90.quantile(0.25):.0f}–{x.k90.quantile(0.75):.0f}; "
                f"{bounded:.0%} of heads bounded by N",
            )
            if bounded > 0.5:
                state = "reference"
                verdict = (
                    f"bounded by the sample count: N = {N} sequences span at most {N - 1} of the {d} "
                    f"dimensions, so k90 ≥ {k:.0f} is only a lower bound. Measuring it at this length needs "
                    f"N well above {d} sequences (a larger corpus and config/gpu-scaling.yaml); the sample sweep "
                    "(scaling.samples at scaling.sample_length) answers C1 for whole blocks"
                )
            else:
                state, verdict = _level_state(q50, bounded, share, dim="D")
            out.append(make_row("C1", **base, **row, state=state, verdict=verdict))
    return out


def _streamed_full_row(heads: pd.DataFrame, source) -> dict:
    """The reference row that stands for the whole view blocks of a streamed model and view
    (docs/method.md §14): not analysed, because N sequences span at most N − 1 of their D
    dimensions, so their k90 could only be bounded by N."""
    x = heads[heads.analysis == "rows"]
    model, view, d = x.model.iloc[0], x.view.iloc[0], int(x.d.iloc[0])
    n = d if view == "all" else 2 * d
    N = int(x.n_samples.iloc[0]) // d  # rows are N sequences × |Q| = d queries (docs/method.md §2)
    D = d * d  # one sample per sequence: |Q| · d scores
    return make_row(
        "C1",
        model=model,
        view=view,
        variant="raw",
        source=source,
        _analysis="full",
        _n=n,
        caveat="",
        scope=f"full matrices (dim {D}, N={N}): not analysed in streamed mode",
        quantity="median k90 over heads",
        value=float("nan"),
        spread="",
        state="reference",
        verdict=f"streamed mode (extraction.store) keeps no score store, so whole view blocks are not analysed: "
        f"N = {N} sequences span at most {N - 1} of their D = {D} dimensions, and k90 would only be a lower "
        "bound; the rows answer C1 at this length, the sample sweep (scaling.samples) for whole blocks",
    )


def c1_scaling_rows(fits, saturations, tables, thresholds: ClaimThresholds) -> list[dict]:
    """C1 from the scaling study: row k90/d at the longest length of the length sweep, the exponent
    of k90 against n, and the full-matrix k90 at the largest N of the sample sweep (saturated: a
    verdict on k90/D; still growing or bounded: inconclusive, naming the N to add)."""
    out = []
    share = thresholds.c1_max_k90_share
    for fp, sp, tp in zip(fits, saturations, tables):
        fit, sat, table = pd.read_csv(fp), pd.read_csv(sp), pd.read_csv(tp)
        for r in fit[fit.scope == "medians"].itertuples():
            rows = table[(table.analysis == "rows") & (table.variant == r.variant) & (table.N == r.N)]
            base = dict(
                model=r.model, view=r.view, variant=r.variant, caveat=caveat_rows(r.variant, r.view), _analysis="rows"
            )
            state, verdict = _level_state(
                r.median_k_share_last,
                r.bounded_share_last,
                share,
                f"more sequences are needed (scaling.length_sequences > {r.N})",
            )
            out.append(
                make_row(
                    "C1",
                    fp,
                    **base,
                    _n=int(r.n_max),
                    scope=f"rows at n = {r.n_max} (d={int(r.d_last)}, {int(r.heads)} heads, N={r.N})",
                    quantity="median k90/d over heads",
                    value=float(r.median_k_share_last),
                    spread=f"k90/d {r.median_k_share_first:.2f} at n={r.n_min} → "
                    f"{r.median_k_share_last:.2f} at n={r.n_max}",
                    state=state,
                    verdict=verdict,
                )
            )
            if rows.bounded_k90.mean() > 0.5:
                state, verdict = (
                    "inconclusive",
                    (
                        "row k90 is bounded by the sample count at some lengths; more "
                        f"sequences are needed (scaling.length_sequences > {r.N})"
                    ),
                )
            elif not np.isfinite(r.alpha_low):
                state, verdict = (
                    "inconclusive",
                    (
                        "one layer: α's interval resamples layers (the heads of a layer are not independent "
                        "draws), so it needs at least two (scaling.max_layers)"
                    ),
                )
            elif r.alpha_high < 1:
                state, verdict = "supported", f"k90/d falls as n grows: k90 grows as n^{r.alpha:.2f}"
            elif r.alpha_low >= 1:
                state, verdict = "not supported", f"k90 grows at least as fast as n (n^{r.alpha:.2f})"
            else:
                state, verdict = (
                    "inconclusive",
                    (
                        "the interval for α includes 1: k90/d may not fall with n; longer "
                        "or more lengths (scaling.lengths) would narrow it"
                    ),
                )
            out.append(
                make_row(
                    "C1",
                    fp,
                    **base,
                    _n=None,
                    scope=f"rows against n = {r.n_min}…{r.n_max} ({int(r.heads)} heads, N={r.N})",
                    quantity="α of median k90 ≈ c·n^α",
                    value=float(r.alpha),
                    spread=(
                        f"95% {r.alpha_low:.2f}–{r.alpha_high:.2f} "
                        f"(layer-cluster bootstrap, t over {int(r.layers)} layers)"
                        if np.isfinite(r.alpha_low)
                        else "no interval (one layer)"
                    )
                    + "; k90/d "
                    f"{r.median_k_share_first:.2f} at n={r.n_min}, {r.median_k_share_last:.2f} at "
                    f"n={r.n_max}",
                    state=state,
                    verdict=verdict,
                )
            )
        k90 = sat[sat.level == "k90"]
        for (model, view, variant), g in k90.groupby(["model", "view", "variant"], sort=False):
            saturated, bounded = float(g.saturated.mean()), float(g.bounded.mean())
            med, D = float(g.k_last.median()), int(g.d.iloc[0])
            Nl, Np, n = int(g.N_last.iloc[0]), int(g.N_prev.iloc[0]), int(g.n.iloc[0])
            q50 = float((g.k_last / g.d).median())
            upper = float((g.k_cv_last / g.d).median())  # the held-out k90: high in expectation
            grow = f"{float(g.k_prev.median()):.0f} → {med:.0f} from N = {Np}"
            if saturated > 0.5:
                state, verdict = _level_state(q50, 0.0, share, dim="D")
                verdict = f"k90 saturates at {med:.0f} of D = {D} by N = {Nl}; {verdict}"
            elif bounded > 0.5:
                state = "inconclusive"
                verdict = f"full-matrix k90 is bounded by N at N = {Nl} (k90 ≥ {med:.0f} of D = {D})"
            elif q50 >= share:
                state, verdict = (
                    "not supported",
                    (
                        f"not low-dimensional: median k90 = {q50:.2f}·D ≥ {share:g}·D at N = {Nl} ({grow}), and the "
                        "in-sample k90 only grows with N (it is low in expectation; docs/method.md §10)"
                    ),
                )
            elif upper < share:
                state, verdict = (
                    "supported",
                    (
                        f"low-dimensional: even the held-out k90 (high in expectation) is {upper:.2f}·D < {share:g}·D "
                        f"at N = {Nl}; in-sample {q50:.2f}·D ({grow})"
                    ),
                )
            else:
                state, verdict = (
                    "inconclusive",
                    (
                        f"full-matrix k90 is still growing at N = {Nl} ({grow}) "
                        f"and its bracket {q50:.2f}–{upper:.2f}·D (in-sample to held-out) straddles {share:g}·D"
                    ),
                )
            if state == "inconclusive":
                verdict += f"; more sequences would answer it: add N = {2 * Nl} to scaling.samples"
            out.append(
                make_row(
                    "C1",
                    sp,
                    model=model,
                    view=view,
                    variant=variant,
                    _analysis="full",
                    _n=None,
                    scope=f"full matrices against N = …{Np}, {Nl} (n={n}, D={D})",
                    quantity=f"median k90/D at N = {Nl}",
                    value=q50,
                    spread=f"median k90 {med:.0f} (held-out {float(g.k_cv_last.median()):.0f}); "
                    f"{saturated:.0%} of heads saturated; {bounded:.0%} bounded by N",
                    state=state,
                    verdict=verdict,
                    caveat="",
                )
            )
    return out


def _why_differs(row: dict, head: dict) -> str:
    if row["_analysis"] == "full":
        return "it measures whole view blocks (k90/D), not rows"
    if row["quantity"].startswith("α"):
        return "α says how k90/d changes with n, not how large it is"
    if row["_n"] is not None and row["_n"] != head["_n"]:
        return f"it is measured at n = {row['_n']}, shorter than the headline's n = {head['_n']}"
    return f"{row['variant']} rows keep each row's offset, which softmax ignores"


def c1_headlines(rows: list[dict]) -> list[dict]:
    """Mark one headline row per (model, view) and make every other C1 row of it say how it relates."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["view"]), []).append(r)
    for (model, view), g in groups.items():
        cands = [r for r in g if r["_analysis"] == "rows" and r.get("_n") is not None]
        if not cands:
            continue
        pref = [r for r in cands if r["variant"] == HEADLINE_VARIANT] or cands
        head = max(pref, key=lambda r: r["_n"])
        head["role"] = "headline"
        head["scope"] = f"headline: {head['scope']}"
        for r in g:
            if r is head:
                continue
            r["role"] = "supporting"
            if r["state"] == "reference":
                continue
            tag = f"the headline row (n = {head['_n']}, {head['variant']}) reads '{head['state']}'"
            if r["state"] != head["state"]:
                r["verdict"] += f" — supporting row; differs from the headline because {_why_differs(r, head)}: {tag}"
            else:
                r["verdict"] += f" — supporting row; agrees with the headline: {tag}"
    return rows


CAVEAT_PER_INPUT = "singular values of softmax probabilities (the whole row's softmax), restricted to the view's block"
CAVEAT_PER_INPUT_PREFIX = "; prefix view: keys outside the view hold the rest of each row's probability"


def c1_per_input_rows(summaries, c1: list[dict]) -> list[dict]:
    """Linformer's analysis beside C1 (docs/method.md §12): per model and view, the median over heads
    of the input-averaged normalised cumulative singular value of the probability block at index
    ⌈d/4⌉, a reference row. It says whether each input's matrix is close to low-rank, which is not
    C1; the verdict names the C1 headline of the same model and view (``c1``: the C1 rows after
    :func:`c1_headlines`) beside it."""
    heads = {(r["model"], r["view"]): r for r in c1 if r.get("role") == "headline"}
    out = []
    for p in summaries:
        sm = pd.read_csv(p)
        for (model, view), x in sm.groupby(["model", "view"], sort=False):
            v = x.value_at_quarter.to_numpy(dtype=float)
            q25, q50, q75 = iqr(v)
            d, q = int(x.d.iloc[0]), int(x.quarter_index.iloc[0])
            inputs = int(x.n_inputs.max())
            head = heads.get((model, view))
            beside = (
                f"beside it, C1's headline (variance across inputs) reads median k90/d = {head['value']:.2f} "
                f"({head['variant']} rows at n = {head['_n']}: {head['state']})"
                if head is not None
                else "this model and view has no C1 headline row to set beside it"
            )
            out.append(
                make_row(
                    "C1",
                    p,
                    model=model,
                    view=view,
                    variant="",
                    scope=f"per input: P blocks (d={d}, {len(x)} heads, {inputs} {x.split.iloc[0]} inputs)",
                    quantity="per-input P: normalised cumulative singular value at index d/4 (Linformer Fig. 1), "
                    "median over heads",
                    value=q50,
                    spread=f"range {np.min(v):.2f}–{np.max(v):.2f}; IQR {q25:.2f}–{q75:.2f} over heads",
                    state="reference",
                    verdict=f"on average over inputs, the top {q} of {d} singular values of a head's probability "
                    f"block carry {q50:.0%} of their sum (median head). This measures whether each input's "
                    "attention matrix is close to low-rank (Linformer's analysis), not the paper's claim that "
                    "the variation of scores across inputs is low-dimensional, so it neither supports nor "
                    f"refutes C1; {beside}",
                    caveat=CAVEAT_PER_INPUT + (CAVEAT_PER_INPUT_PREFIX if view == "prefix" else ""),
                )
            )
    return out


# --------------------------------------------------------------------------------------------- C2


def c2_rows(overlap_summary, thresholds: ClaimThresholds) -> list[dict]:
    """Overlap and captured share across layers and across models, for both row variants.

    Judged on the half-sample pairs (half a of one head against half b of the other, averaged over
    both directions: ``half_median``), which share no sequence. The full-sample pair values compare
    two heads estimated on the same sequences: their sampling noise is correlated through those
    inputs, and can lift the overlap of unrelated subspaces above the threshold (a few sequences span
    only a few directions, which every head's top-k then picks up). The half-sample pairs also match
    the split-half ceiling in sample size. The full-sample median is reported beside it."""
    s = pd.read_csv(overlap_summary)
    k = nearest_measured(s.k, thresholds.k_report)
    s = s[s.k == k]
    out = []
    ceilings = s[s.scope == "split_half"].set_index(["model_a", "view", "variant", "quantity"])
    for r in s[s.scope.isin(["all_layer_pairs", "cross_model"])].itertuples():
        cross = r.scope == "cross_model"
        pair = f"{r.model_a}×{r.model_b}" if cross else r.model_a
        ceil_ratio = [
            float(ceilings.loc[(m, r.view, r.variant, r.quantity)].median_ratio_random) for m in {r.model_a, r.model_b}
        ]
        what = "overlap_k" if r.quantity == "overlap" else "captured_k (share of b's variance in a's subspace)"
        ratio = float(r.half_median) / float(r.random)
        caveats = [caveat_rows(r.variant, r.view, r.u1_constant_median)]
        if cross:
            caveats.append(CAVEAT_CROSS)
        if min(ceil_ratio) < thresholds.c2_min_ratio_random and r.quantity != "overlap":
            # captured_k of a head's other half in its own top-k subspace is at most that half's EV(k):
            # with a flat spectrum no N lifts it to the threshold, so the overlap row answers instead
            state = "reference"
            verdict = (
                f"cannot answer: even a head's own split-half captured share is only ×{min(ceil_ratio):.1f} "
                f"random, and captured_k is bounded by the head's top-{k} variance share (a spectrum too flat "
                f"at k = {k}), not by the sample count; the overlap_k row of this scope answers C2"
            )
        elif min(ceil_ratio) < thresholds.c2_min_ratio_random:
            state = "inconclusive"
            verdict = (
                f"the split-half ceiling is only ×{min(ceil_ratio):.1f} random: the subspaces are not "
                "estimated reliably; more fit sequences would answer it (the overlap ceiling grows with "
                "sampling.n_sequences.fit: ×1.7–2.0 at 96, ×2.1–2.7 at 384 for prefix rows; "
                "docs/performance.md)"
            )
        elif ratio >= thresholds.c2_min_ratio_random:
            state, verdict = "supported", f"shared subspace: ≥ {thresholds.c2_min_ratio_random:g}× random"
        else:
            state, verdict = "not supported", f"near random: < {thresholds.c2_min_ratio_random:g}× random"
        out.append(
            make_row(
                "C2",
                overlap_summary,
                model=pair,
                view=r.view,
                variant=r.variant,
                k=k,
                scope=f"{'across models' if cross else 'across layers'} ({r.n_pairs} pairs)",
                quantity=f"median {what} of half-sample pairs (half a of one head, half b of the other; "
                f"random {r.random:.3f})",
                value=float(r.half_median),
                spread=f"×{ratio:.1f} random; at {r.median_ratio_ceiling:.2f} of the split-half ceiling "
                f"(×{min(ceil_ratio):.1f} random); full-sample pairs (same sequences, not judged) median "
                f"{r.median:.2f}, ×{r.median_ratio_random:.1f} random, p10–p90 {r.p10:.2f}–{r.p90:.2f}",
                state=state,
                verdict=verdict,
                caveat="; ".join(c for c in caveats if c),
                method=r.quantity,
            )
        )
    return out
