"""Which models the capture backend reproduces exactly, checked before any score is written.

:func:`load_capture_model` loads a model directory for capture and refuses, with
:class:`~eigenattn.errors.UnsupportedModelError`, what cannot be stored as one score matrix per
layer (encoder–decoder models; families whose attention module does not accept a custom
attention implementation). :func:`equivalence_probe` then runs one small batch twice, through
the capture backend and through the model's own eager attention with ``output_attentions``, and
refuses the model unless

- every attention layer reached the backend (families that compute attention in their own code,
  such as BLOOM's ALiBi or DeBERTa's disentangled attention, never do);
- each layer's mask is one of the kinds of :mod:`eigenattn.capture.masks`, the same for every sequence,
  and consistent with the ``sliding_window`` the model passes;
- the probabilities recomputed from the stored contract, ``softmax([S + mask, sink])`` per layer,
  match eager ``output_attentions`` within :data:`PROB_TOL`, and the model's outputs (last hidden
  state) match within :data:`HIDDEN_TOL`.

The tolerances are for float32, which the probe always uses (no autocast): both paths then run
the same operations, and what they measure is whether the backend computes the model's
attention, not storage precision.

The probe also measures the scores *as stored*: the captured scores cast to each storage dtype
(float16, float32), pushed through the same formula and compared with the same eager
probabilities (:attr:`ProbeResult.stored_errors`). :func:`resolve_store_dtype` turns that into
the dtype of the store: ``auto`` is float16 where the cast scores reproduce P within
:data:`STORED_PROB_TOL` and float32 where they do not; an explicit float16 that fails is a
:class:`~eigenattn.errors.ConfigError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from eigenattn.capture.interface import ScoreCapture, StopForward, capturing, register
from eigenattn.capture.masks import classify_visibility, describe, hides_future, visibility
from eigenattn.errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

PROB_TOL = 1e-5
"""Largest allowed |softmax(S + mask, sink) − eager output_attentions| (float32)."""
HIDDEN_TOL = 1e-4
"""Largest allowed |capture − eager| of the last hidden state, relative to max(1, max |eager|) (float32)."""
STORED_PROB_TOL = 5e-3
"""Largest allowed |softmax(cast S + mask, sink) − eager output_attentions| for the scores as stored
(after the cast to the store's dtype). float16 keeps ~3 significant digits of each score, so its
probability error grows with |S|: 6e-4 to 2.2e-3 for the tiny test families, minilm and smollm2, but
~1e-2 and more for a T5 encoder whose unscaled logits plus position bias reach |S| ~ 200."""
STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
"""The storage dtypes whose cast the probe measures (``extraction.dtype``, besides ``auto``)."""
PROBE_SEQUENCES = 2
"""Sequences in the probe batch (the first ones of the shard): enough to check batching, small in memory."""

SUPPORTED_HINT = "see docs/models.md for the families tested and refused"


def model_class(hf_config, label: str):
    """The transformers class to load ``hf_config`` with for capture (base model, no head).

    Encoder–decoder models are refused unless the checkpoint is an encoder alone (its
    ``architectures`` names an ``…EncoderModel`` class such as ``T5EncoderModel``).
    """
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    if arch and arch.endswith("EncoderModel") and hasattr(transformers, arch):
        return getattr(transformers, arch)
    if getattr(hf_config, "is_encoder_decoder", False):
        enc = f"{type(hf_config).__name__.removesuffix('Config')}EncoderModel"
        has_enc = hasattr(transformers, enc)
        raise UnsupportedModelError(
            f"it is an encoder–decoder model ({arch or type(hf_config).__name__}): its decoder has self- and "
            "cross-attention in every layer, which cannot be stored as one score matrix per layer",
            (
                f"save its encoder alone and point the model at that directory, e.g. "
                f"{enc}.from_pretrained(src).save_pretrained(dst)"
                if has_enc
                else "save its encoder alone as an encoder-only model, or use an encoder-only or decoder-only model"
            ),
            model=label,
            model_type=getattr(hf_config, "model_type", None),
        )
    return transformers.AutoModel


def load_capture_model(model_dir, label: str, device="cpu", attn_implementation: str | None = None):
    """Tokenizer and base model loaded with the capture backend (float32), or a clear refusal."""
    impl = attn_implementation or register()
    config = AutoConfig.from_pretrained(model_dir)
    cls = model_class(config, label)
    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        model = cls.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
    except (KeyError, ValueError) as e:
        if impl not in str(e) and "attention" not in str(e).lower():
            raise
        raise UnsupportedModelError(
            f"its attention does not go through transformers' AttentionInterface: loading it with the "
            f"'{impl}' attention implementation fails ({type(e).__name__}: {str(e)[:200]})",
            f"use a model whose attention goes through AttentionInterface; {SUPPORTED_HINT}",
            model=label,
            model_type=config.model_type,
        ) from e
    model.eval().to(device)
    return tok, model


@dataclass
class ProbeResult:
    """What the probe established about each attention layer (indices 0..n_layers-1)."""

    n_layers: int
    seq_len: int
    masks: dict[int, dict]
    modifiers: dict[int, dict]
    sinks: dict[int, np.ndarray]
    shapes: dict[int, dict]
    prob_error: float
    hidden_error: float
    sequences: int
    layer_errors: dict[int, float] = field(default_factory=dict)
    mask_tokens: int = 0
    """The length the masks were read at: ``seq_len`` (the probe's own), or the run's length once
    :meth:`use_masks` replaced them with those of a full-length pass."""
    stored_errors: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per storage dtype and layer: max |softmax(S cast to the dtype + mask, sink) - eager| (inf
    where the cast overflows)."""

    def stored_error(self, dtype: str, layers=None) -> float:
        """The largest error of the scores stored as ``dtype``, over ``layers`` (None = all)."""
        per_layer = self.stored_errors[dtype]
        return max(per_layer[int(l)] for l in (per_layer if layers is None else layers))

    def use_masks(self, masks: dict[int, dict], n: int) -> None:
        """Take ``masks`` (layer -> description, read at ``n`` tokens by :func:`masks_at_length`)
        as the layers' masks; the layers not in ``masks`` are dropped (their kind at ``n`` is
        unknown)."""
        self.masks = dict(masks)
        self.mask_tokens = int(n)

    def causal(self, layers) -> bool:
        """Every one of ``layers`` hides all keys after the query (causal, sliding window or chunked)."""
        return all(hides_future(self.masks[int(l)]) for l in layers)

    def summary(self, dtype: str, layers=None) -> dict:
        """The probe's findings for the store's attrs; ``dtype``: the store's (resolved) dtype,
        ``layers``: the stored layers (the stored errors are over those; None = all)."""
        out = {
            "sequences": self.sequences,
            "tokens": self.seq_len,  # the probe's length: a prefix of each sequence in streamed mode
            "mask_tokens": self.mask_tokens or self.seq_len,  # the length the layer masks were read at
            "max_prob_error": self.prob_error,
            "prob_tolerance": PROB_TOL,
            "max_hidden_error": self.hidden_error,
            "hidden_tolerance": HIDDEN_TOL,
            "hidden_error_definition": "max |capture - eager| of the last hidden state / max(1, max |eager|)",
            "reference": "the same model with attn_implementation='eager', output_attentions=True, float32",
        }
        if self.stored_errors:
            out.update(
                {
                    "max_prob_error_stored": _finite_or_none(self.stored_error(dtype, layers)),
                    "stored_prob_errors": {
                        k: _finite_or_none(self.stored_error(k, layers)) for k in self.stored_errors
                    },
                    "stored_prob_tolerance": STORED_PROB_TOL,
                    "stored_error_definition": "max |softmax([S cast to the storage dtype + mask, sink]) - "
                    "eager output_attentions|; null where the cast overflows",
                }
            )
        return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None  # JSON attrs hold no inf


def resolve_store_dtype(probe: ProbeResult, requested: str, label: str, layers=None) -> str:
    """The storage dtype for ``extraction.dtype`` = ``requested`` (auto, float16 or float32).

    ``auto``: float16 where the float16 scores of ``layers`` (the stored ones; None = all)
    reproduce the model's probabilities within :data:`STORED_PROB_TOL`, else float32, with a log
    line naming the measured error. An explicit dtype whose cast fails that tolerance raises
    :class:`~eigenattn.errors.ConfigError`.
    """
    if requested != "auto" and requested not in STORE_DTYPES:
        raise ConfigError("extraction.dtype", f"unknown dtype '{requested}'", "use auto, float16 or float32")
    err = {k: probe.stored_error(k, layers) for k in STORE_DTYPES}
    if requested == "auto":
        e16 = err["float16"]
        if e16 <= STORED_PROB_TOL:
            log.info(
                "extraction.dtype auto for %s: float16 (its float16 scores reproduce the eager "
                "probabilities to %.2e, within the tolerance %.0e)",
                label,
                e16,
                STORED_PROB_TOL,
            )
            return "float16"
        log.warning(
            "extraction.dtype auto for %s: float32, because its float16 scores reproduce the eager "
            "probabilities only to %.2e, over the tolerance %.0e (float32: %.2e)",
            label,
            e16,
            STORED_PROB_TOL,
            err["float32"],
        )
        return "float32"
    e = err[requested]
    if not e <= STORED_PROB_TOL:
        raise ConfigError(
            "extraction.dtype",
            f"is {requested}, but {requested} scores of model {label} reproduce its eager attention "
            f"probabilities only to max |softmax(S + mask, sink) - eager| = {e:.2e}, over the "
            f"tolerance {STORED_PROB_TOL:.0e} (float32: {err['float32']:.2e}); no score was written",
            "use dtype: auto (float16 where it is exact enough, float32 where not) or float32",
        )
    return requested


def _first_tensor(out) -> torch.Tensor:
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out[0]


def mask_info(mask: torch.Tensor | None, n: int) -> tuple[dict | None, str]:
    """(mask description, problem) of the additive mask a layer received for an unpadded batch."""
    if mask is None:
        return {"kind": "bidirectional"}, ""
    if mask.shape[-2:] != (n, n):
        return None, f"its mask has shape {tuple(mask.shape)}, not (…, {n}, {n})"
    m = mask.detach().reshape(-1, n, n)
    if m.dtype == torch.bool:
        visible = m
    else:
        m = m.float()
        visible = m == 0
        hidden = m <= torch.finfo(torch.float32).min / 2  # eager masks use dtype-min (or -inf)
        if not bool((visible | hidden).all()):
            return None, (
                "its mask carries additive values other than 0 and -inf (a bias inside the mask), "
                "which the store's mask kinds cannot express"
            )
    if not bool((visible == visible[:1]).all()):
        return None, "its mask differs between sequences or heads of an unpadded batch"
    info = classify_visibility(visible[0].cpu().numpy())
    if info is None:
        return None, "its mask is not bidirectional, causal, a sliding window or chunked"
    return info, ""


def received_mask(cap: ScoreCapture, layer: int, n: int) -> tuple[dict | None, str]:
    """(mask description, problem) of the mask ``layer`` received in ``cap``'s pass over ``n``
    tokens, checked against the ``sliding_window`` the layer passes (a mask that shows keys outside
    that window would make eager and fused attention disagree)."""
    info, problem = mask_info(cap.masks[layer], n)
    if info is None:
        return None, problem
    w = cap.modifiers[layer].get("sliding_window")
    if isinstance(w, (tuple, list)):
        w = max(w)
    if isinstance(w, int) and w < n:
        i, j = np.indices((n, n))
        if (visibility(info, n) & (np.abs(i - j) > w)).any():
            return None, (
                f"it passes sliding_window={w}, but the mask it receives ({describe(info)}) "
                "shows keys outside that window, so eager and fused attention would disagree"
            )
    return info, ""


@torch.no_grad()
def masks_at_length(model, ids: torch.Tensor, label: str, last_layer: int) -> dict[int, dict]:
    """Every layer's mask up to ``last_layer``, at the full length of ``ids`` (one unpadded
    sequence, (1, n)): one forward pass that keeps no score (plain layers run SDPA) and stops
    after ``last_layer``.

    The equivalence probe may run on a prefix (streamed mode); a sliding window or chunk at least
    as long as that prefix but shorter than ``n`` looks plain causal there. This reads the masks
    the layers actually receive at the run's length, so the recorded kinds are the real ones."""
    n = int(ids.shape[1])
    cap = ScoreCapture(layers=[], store_dtype=torch.float32)
    cap.stop_after = int(last_layer)
    try:
        with capturing(cap):
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except StopForward:
        pass
    out = {}
    for l in range(int(last_layer) + 1):
        problem = "its attention did not reach the capture backend" if l not in cap.masks else ""
        info = None
        if not problem:
            info, problem = received_mask(cap, l, n)
        if info is None:
            raise UnsupportedModelError(
                f"layer {l} at the run's length ({n} tokens): {problem}",
                f"use a model whose attention the backend reproduces; {SUPPORTED_HINT}",
                model=label,
                model_type=getattr(model.config, "model_type", None),
            )
        out[l] = info
    return out


@torch.no_grad()
def equivalence_probe(model, ids: torch.Tensor, label: str) -> ProbeResult:
    """Run ``ids`` (B, n) through the capture backend and through eager attention; refuse on mismatch."""
    model_type = getattr(model.config, "model_type", None)

    def refuse(problem, fix=f"use a model whose attention the backend reproduces; {SUPPORTED_HINT}"):
        raise UnsupportedModelError(problem, fix, model=label, model_type=model_type)

    n = int(ids.shape[1])
    mask = torch.ones_like(ids)
    impl = model.config._attn_implementation
    cap = ScoreCapture(layers=None, store_dtype=torch.float32)
    try:
        with capturing(cap):
            h_cap = _first_tensor(model(input_ids=ids, attention_mask=mask)).float()
    except UnsupportedModelError as e:
        e.model, e.model_type = label, e.model_type or model_type
        raise
    if not cap.scores:
        refuse(
            "no scores captured: its attention never reaches transformers' AttentionInterface (it computes "
            "attention in its own code, as BLOOM, MPT and Falcon do for ALiBi and DeBERTa for its "
            "disentangled attention)",
            f"use a model whose attention goes through AttentionInterface; {SUPPORTED_HINT}",
        )

    sentinel = ScoreCapture()
    model.set_attn_implementation("eager")
    try:
        with capturing(sentinel):
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    if sentinel.calls:
        refuse("its attention implementation could not be switched to eager for the equivalence probe")
    att = getattr(out, "attentions", None)
    if not att or any(a is None for a in att):
        refuse("its eager attention returns no output_attentions, so the captured scores cannot be checked")
    layers = sorted(cap.scores)
    if layers != list(range(len(att))):
        refuse(
            f"{len(att)} attention layers run under eager attention, but the capture backend saw layers "
            f"{layers}: some attention is computed outside AttentionInterface"
        )
    h_ref = _first_tensor(out).float()
    if h_ref.shape != h_cap.shape:
        refuse(f"its outputs have shape {tuple(h_cap.shape)} under capture and {tuple(h_ref.shape)} under eager")
    hidden_error = float((h_cap - h_ref).abs().max() / max(1.0, float(h_ref.abs().max())))

    masks, errors, stored = {}, {}, {}
    for l in layers:
        info, problem = received_mask(cap, l, n)
        if info is None:
            refuse(f"layer {l}: {problem}")
        masks[l] = info
        s = cap.scores[l]
        vis = torch.from_numpy(visibility(info, n)).to(s.device)
        sink = None
        if l in cap.sinks:
            sink = cap.sinks[l].double().to(s.device)
            if sink.numel() != s.shape[1]:
                refuse(f"layer {l} passes {sink.numel()} sink logits for {s.shape[1]} query heads")
        probs = _probabilities(s, vis, sink)
        ref = att[l].double()
        if ref.shape != probs.shape:
            refuse(
                f"layer {l}: eager output_attentions have shape {tuple(ref.shape)}, the captured scores "
                f"{tuple(probs.shape)}"
            )
        errors[l] = float((probs - ref).abs().max())
        for name, dt in STORE_DTYPES.items():  # the scores as the store would hold them
            cast = s.to(dt)
            e = (
                float((_probabilities(cast, vis, sink) - ref).abs().max())
                if bool(torch.isfinite(cast).all())
                else float("inf")
            )  # an overflow (a stored inf also fails the readers' finiteness check)
            stored.setdefault(name, {})[l] = e if e == e else float("inf")
    prob_error = max(errors.values())
    log.info(
        "equivalence probe for %s (%s): %d layers, masks %s, max |P - P_eager| %.2e (tol %.0e), "
        "max hidden-state difference %.2e (tol %.0e); as stored: %s (tol %.0e)",
        label,
        model_type,
        len(layers),
        sorted({describe(m) for m in masks.values()}),
        prob_error,
        PROB_TOL,
        hidden_error,
        HIDDEN_TOL,
        ", ".join(f"{k} {max(v.values()):.2e}" for k, v in stored.items()),
        STORED_PROB_TOL,
    )
    if not prob_error <= PROB_TOL or not hidden_error <= HIDDEN_TOL:
        worst = max(errors, key=errors.get)
        refuse(
            f"the capture backend does not reproduce its eager attention: max |softmax(S + mask, sink) - "
            f"eager output_attentions| = {prob_error:.2e} (tolerance {PROB_TOL:.0e}, worst in layer {worst}), "
            f"max last-hidden-state difference {hidden_error:.2e} (tolerance {HIDDEN_TOL:.0e}); some modifier of "
            "its scores or mask is not captured",
            f"use a supported family; {SUPPORTED_HINT}",
        )
    return ProbeResult(
        n_layers=len(layers),
        seq_len=n,
        masks=masks,
        modifiers={l: cap.modifiers[l] for l in layers},
        sinks={l: cap.sinks[l].cpu().numpy() for l in cap.sinks},
        shapes=dict(cap.shapes),
        prob_error=prob_error,
        hidden_error=hidden_error,
        sequences=int(ids.shape[0]),
        layer_errors=errors,
        stored_errors=stored,
    )


def _probabilities(s: torch.Tensor, vis: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """P = softmax([S + mask, sink])[..., :n] in float64 (docs/models.md), from scores (B, H, n, n)."""
    n = s.shape[-1]
    logits = s.double().masked_fill(~vis, float("-inf"))
    if sink is None:
        return torch.softmax(logits, dim=-1)
    logits = torch.cat([logits, sink.reshape(1, -1, 1, 1).expand(s.shape[0], -1, n, 1)], dim=-1)
    return torch.softmax(logits, dim=-1)[..., :n]
