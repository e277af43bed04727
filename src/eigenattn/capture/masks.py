"""Per-layer attention masks: what each layer lets a query see, and which layers a view may use.

A layer's mask is recorded in the score store as a small dict (``attrs["layer_masks"]``, one per
captured layer, aligned with ``attrs["layers"]``):

- ``{"kind": "bidirectional"}``: every query sees every key;
- ``{"kind": "causal"}``: query ``i`` sees keys ``j <= i``;
- ``{"kind": "sliding_window", "window": w}``: causal and ``i - j < w`` (transformers'
  ``sliding_window_overlay``);
- ``{"kind": "chunked", "chunk": c}``: causal and ``i // c == j // c`` (``chunked_overlay``);
- ``{"kind": "bidirectional_sliding_window", "window": w}``: ``|i - j| <= w`` (ModernBERT's
  local layers, ``sliding_window_bidirectional_overlay``).

The kind is read from the mask the layer actually receives, at the extracted length ``n``: a
window or chunk that covers the whole sequence is recorded as plain ``causal``, which it then is.

A view (docs/method.md §2) is only analysed on layers whose mask shows the whole view block; entries a
mask hides are never analysed as scores. :func:`visible_layers` makes that decision.
"""

from __future__ import annotations

import logging

import numpy as np

from eigenattn.config.views import view_slices
from eigenattn.errors import InputError

log = logging.getLogger(__name__)

KINDS = ("bidirectional", "causal", "sliding_window", "chunked", "bidirectional_sliding_window")
# Kinds that hide every key after the query (a store is `causal` when all its layers are one of these).
CAUSAL_KINDS = ("causal", "sliding_window", "chunked")


def visibility(info: dict, n: int) -> np.ndarray:
    """The (n, n) boolean matrix of a mask description: True where query i sees key j."""
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    kind = info["kind"]
    if kind == "bidirectional":
        return np.ones((n, n), dtype=bool)
    if kind == "causal":
        return j <= i
    if kind == "sliding_window":
        return (j <= i) & (i - j < int(info["window"]))
    if kind == "chunked":
        c = int(info["chunk"])
        return (j <= i) & (i // c == j // c)
    if kind == "bidirectional_sliding_window":
        return np.abs(i - j) <= int(info["window"])
    raise ValueError(f"unknown mask kind '{kind}' (known: {', '.join(KINDS)})")


def classify_visibility(visible: np.ndarray) -> dict | None:
    """The mask description whose pattern equals ``visible`` (square, n×n), or None if none does."""
    visible = np.asarray(visible, dtype=bool)
    n = visible.shape[-1]
    if visible.shape != (n, n):
        return None
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    if visible.all():
        return {"kind": "bidirectional"}
    lower = j <= i
    if np.array_equal(visible, lower):
        return {"kind": "causal"}
    if not visible[~lower].any():  # hides the future: a window or chunks
        w = int(visible.sum(axis=1).max())
        if np.array_equal(visible, visibility({"kind": "sliding_window", "window": w}, n)):
            return {"kind": "sliding_window", "window": w}
        c = int(visible[:, 0].sum())  # the first chunk is the keys query 0's chunk-mates see
        if c >= 1 and np.array_equal(visible, visibility({"kind": "chunked", "chunk": c}, n)):
            return {"kind": "chunked", "chunk": c}
        return None
    w = int(visible[0].sum()) - 1  # query 0 sees keys 0..w
    if w >= 0 and np.array_equal(visible, visibility({"kind": "bidirectional_sliding_window", "window": w}, n)):
        return {"kind": "bidirectional_sliding_window", "window": w}
    return None


def describe(info: dict) -> str:
    kind = info["kind"]
    if kind in ("sliding_window", "bidirectional_sliding_window"):
        return f"{kind.replace('_', ' ')} of {info['window']}"
    if kind == "chunked":
        return f"chunked, chunks of {info['chunk']}"
    return kind


def hides_future(info: dict) -> bool:
    return info["kind"] in CAUSAL_KINDS


def layer_masks(score_attrs: dict) -> list[dict]:
    """Each captured layer's mask description; stores written before per-layer masks use ``causal``."""
    masks = score_attrs.get("layer_masks")
    if masks is None:
        kind = "causal" if score_attrs.get("causal") else "bidirectional"
        return [{"kind": kind} for _ in score_attrs["layers"]]
    return list(masks)


def visible_layers(score_attrs: dict, view: str, n: int | None = None) -> tuple[list[int], list[dict]]:
    """(kept layers, skipped) for ``view``: a layer is kept only if its mask shows the whole view block.

    ``skipped`` lists ``{"layer", "mask", "reason"}`` for every layer left out; each is logged as a
    warning. ``n`` defaults to the store's ``seq_len``.
    """
    n = int(score_attrs["seq_len"] if n is None else n)
    # The query/key ranges of a view do not depend on causality; `all` asks for every pair.
    qs, ks = view_slices(view, n, False)
    kept, skipped = [], []
    for layer, info in zip(score_attrs["layers"], layer_masks(score_attrs)):
        block = visibility(info, n)[qs, ks]
        if block.all():
            kept.append(int(layer))
            continue
        reason = (
            f"its mask ({describe(info)}) hides {int((~block).sum())} of the {block.size} "
            f"entries of view '{view}' (queries {qs.start}..{qs.stop - 1}, keys {ks.start}..{ks.stop - 1}, "
            f"seq_len {n})"
        )
        skipped.append({"layer": int(layer), "mask": dict(info), "reason": reason})
        log.warning("model %s: layer %d skipped in view '%s': %s", score_attrs.get("model", "?"), layer, view, reason)
    return kept, skipped


def select_visible(scores, score_attrs: dict, view: str):
    """The layers of a score array (N, L, H, n, n) that ``view`` may use, and attrs saying which were skipped.

    Returns (scores of the kept layers, attrs with ``layers``/``layer_masks`` of the kept layers and
    ``skipped_layers``). Raises when no layer is left.
    """
    kept, skipped = visible_layers(score_attrs, view)
    if not kept:
        raise InputError(
            f"scores of model {score_attrs.get('model', '?')}",
            f"every captured layer's mask hides "
            f"part of view '{view}' ({skipped[0]['reason']}), so the view has nothing to analyse",
            "use a seq_len the windows cover, or leave this view (eigen.views) or model (run_models) out",
        )
    if not skipped:
        return scores, {**score_attrs, "skipped_layers": []}
    layers = [int(x) for x in score_attrs["layers"]]
    idx = [layers.index(l) for l in kept]
    masks = layer_masks(score_attrs)
    return scores[:, idx], {
        **score_attrs,
        "layers": kept,
        "layer_masks": [masks[i] for i in idx],
        "skipped_layers": skipped,
    }
