"""Per-head plans inside a model's forward pass, and the per-head probes that plans are chosen with.

:func:`apply_plan` is the public way to run a plan (:mod:`eigenattn.reconstruction.plans`) in a
``transformers`` model outside the pipeline; the pipeline's plug-in loads plans through it::

    from eigenattn.reconstruction.plan_attention import apply_plan, load_for_plans
    model = load_for_plans("path/to/model", causal=True)          # the "partial" attention backend
    apply_plan(model, "results/plans/smollm2/plans/tv-0.3.json", rows_store="results/eigen/smollm2/prefix/rows.zarr")
    model(input_ids)          # (batch, seq_len) token ids, exactly the plan's seq_len: every head runs its method

Each attention layer with a plan carries a :class:`LayerPlan`: its heads split into groups that
share a method. A group runs exactly the code that runs the method for a whole layer, on its own
heads' Q, K and V: a peer through :func:`peer_attention`, a paper estimator through a
:class:`PartialMap` fitted for those heads (``partial_scores``), ``exact`` as eager attention. So a
head under a plan computes what the same method computes for it when run alone.

**Real kernels** (``apply_plan(..., kernels="auto")``, the default: FlexAttention compiled on CUDA,
eager on a CPU): the model is switched to the ``eigenattn_plan`` attention backend
(:func:`register_kernels`), whose masks are SDPA's (none for an unpadded causal or bidirectional
batch) and whose layers without a plan run ``transformers``' own SDPA attention. A planned layer
runs each group of heads through its method's real kernel (:mod:`eigenattn.reconstruction.kernels`):
exact heads through SDPA, sink + window through one FlexAttention call with a block mask,
vertical-slash through gathered columns and diagonals merged by log-sum-exp, Nyström through its
GEMMs and the paper's estimators through s scores, the map and P·V; a whole-scope plan
(``plan.scope == "whole"``) through the whole-scope kernels, on every query. None of them forms the
n×n score matrix; each equals its dense-mask reference (``kernels="dense"``, the code above) within
float tolerance (``tests/test_plan_kernels.py``). A padded batch (a mask that is not plain causal
or all-visible) and the top-k oracle, which has no kernel, run the dense reference.

:class:`HeadProbe` sets a gate ξ_h = 1 on every head's output (for the first-order sensitivity
∂loss/∂ξ_h) and records each head's attention mass on the sink keys and on the diagonal and its
entropy, over the view's queries.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from eigenattn.capture.attention import expand_heads, finish_attention, mask_is_plain
from eigenattn.capture.interface import IGNORED_KWARGS, check_kwargs
from eigenattn.config.schema import enum
from eigenattn.errors import InputError
from eigenattn.reconstruction import kernels as K
from eigenattn.reconstruction.partial import (
    ATTR,
    LINFORMER_ATTR,
    PLAN_ATTR,
    PROBE_ATTR,
    UNIFORM_ATTR,
    PartialMap,
    attention_modules,
    fit_map,
    partial_attention_forward,
    partial_scores,
)
from eigenattn.reconstruction.peer_attention import PEER_ATTR, PeerSpec, peer_attention
from eigenattn.reconstruction.plans import EXACT, Plan, is_peer, read_plan

KERNEL_MODES = enum("plans.kernels")  # auto, compiled, eager, dense
# what the ``partial`` backend runs (a plan, peer, map, probe, Linformer, the uniform floor)
ATTACHMENTS = (PLAN_ATTR, PEER_ATTR, ATTR, PROBE_ATTR, LINFORMER_ATTR, UNIFORM_ATTR)
PLAN_KERNELS_IMPL = "eigenattn_plan"


class LayerPlan:
    """The groups of one layer's plan: (head indices, runner) with runner a PeerSpec, a PartialMap or None (exact).

    ``kernels``: ``"dense"`` runs the dense-mask reference; ``"compiled"`` or ``"eager"`` the real
    kernels (FlexAttention compiled or eager; the other kernels are the same in both), set by
    :func:`apply_plan`. ``causal``: the model's causality (the plan's)."""

    def __init__(self, layer: int, groups: list, *, causal: bool = False, kernels: str = "dense", scope: str = "view"):
        self.layer = layer
        self.scope = scope
        self.groups = groups
        self.heads = sorted(int(h) for idx, _ in groups for h in idx.tolist())
        self.causal = bool(causal)
        self.kernels = kernels

    def __repr__(self) -> str:
        parts = [f"{'exact' if r is None else r!r}: heads {idx.tolist()}" for idx, r in self.groups]
        return f"LayerPlan(layer {self.layer}; " + "; ".join(parts) + ")"

    def __call__(self, module, query, key, value, mask, scaling, dropout):
        return plan_attention(module, query, key, value, mask, scaling, dropout, self)


def layer_plans(plan: Plan, stats=None) -> dict[int, LayerPlan]:
    """The :class:`LayerPlan` of every layer of ``plan``. ``stats``: the view's
    :class:`eigenattn.spectra.stores.RowStats`, needed where a head runs a paper estimator or
    baseline (their maps are fitted from the fit split's μ, U, Λ)."""
    st = plan.settings
    out = {}
    for layer, heads in plan.by_layer().items():
        by_method: dict[tuple, list[int]] = {}
        for h in heads:
            by_method.setdefault((h.method, h.strategy, h.s), []).append(h.head)
        groups = []
        for (method, strategy, s), idx in sorted(by_method.items()):
            index = torch.tensor(sorted(idx), dtype=torch.long)
            if method == EXACT:
                groups.append((index, None))
            elif is_peer(method):
                spec = PeerSpec(
                    method,
                    s,
                    seq_len=plan.seq_len,
                    query_range=plan.query_range,
                    key_range=plan.key_range,
                    causal=plan.causal,
                    q_last=st["q_last"],
                    sinks=st["sinks"],
                    pinv=strategy if method == "nystrom" else None,
                    key="plan",
                )
                groups.append((index, spec))
            else:
                if stats is None:
                    raise InputError(
                        f"plan of {plan.model}",
                        f"layer {layer} runs {method} on heads {sorted(idx)}, whose maps need the fit statistics",
                        "pass rows_store= (the view's rows.zarr) to apply_plan",
                    )
                kw = {"ridge": st["ridge"], "rank": st["rank"], "seed": st["seed"], "heads": index.numpy()}
                groups.append((index, fit_map(stats, layer, method, strategy, s, **kw)))
        out[layer] = LayerPlan(layer, groups, causal=plan.causal, scope=plan.scope)
    return out


def apply_plan(model, plan, rows_store=None, stats=None, kernels: str = "auto") -> dict[int, LayerPlan]:
    """Run ``plan`` in ``model``: each planned head runs its method, heads and layers outside the
    plan stay exact. Returns the layer plans; :func:`eigenattn.reconstruction.partial.detach`
    removes them (the model is then exact again).

    Arguments:

    - ``model``: the plan's own pretrained ``transformers`` model (same layers and heads), loaded
      on the ``partial`` attention backend: :func:`load_for_plans`, or ``from_pretrained(...,
      attn_implementation=eigenattn.reconstruction.partial.register())``.
    - ``plan``: a :class:`eigenattn.reconstruction.plans.Plan`, or the path of a plan file
      (``results/plans/{model}/plans/{damage}-{budget}.json``, docs/data-contract.md).
    - ``rows_store``: the path of the plan's view's ``rows.zarr``
      (``results/eigen/{model}/{view}/rows.zarr``), the fit split's per-head row statistics
      (μ, U, Λ). **Needed when any head runs a paper estimator or baseline** (eigenspace,
      conditional_gaussian, mean, subset_only): their maps are refitted from it when the plan is
      applied. A plan of exact and peers only (nystrom, vertical_slash, sink_window) needs neither
      this nor ``stats``. An InputError names the layer and heads that need it.
    - ``stats``: the same statistics already opened, an
      :class:`eigenattn.spectra.stores.RowStats` (the pipeline passes its own; give one of
      ``rows_store`` or ``stats``, not both). Its model, view and length must be the plan's.
      A whole-scope plan needs neither.
    - ``kernels``: ``"compiled"`` runs each method's real kernel, with FlexAttention compiled by
      ``torch.compile`` (a C++ compiler on CPU, Triton on CUDA; the first call of each shape
      compiles); ``"eager"`` the same kernels with eager FlexAttention (no compiler; sink + window
      then materialises its scores); ``"auto"`` (default): compiled when the model is on CUDA,
      eager on a CPU; ``"dense"`` the dense-mask reference, every score computed and the unkept
      ones masked (what the pipeline's reconstruction tables measure). The real kernels switch
      the model to the ``eigenattn_plan`` backend (SDPA where no plan runs);
      :func:`eigenattn.reconstruction.partial.detach` leaves it there, exact.

    **Inputs must be exactly ``plan.seq_len`` tokens** (the sampled passages' length,
    ``sampling.seq_len``): the view's query and key ranges, the subset positions of the paper
    estimators and the peers' windows are fixed positions of a sequence of that length. Tokenise
    each passage with the model's tokenizer, truncated to ``seq_len`` and without padding (as
    :func:`eigenattn.corpus.passages.tokenize_passages` does), and call ``model(input_ids=ids)`` with
    ``ids`` of shape (batch, seq_len), no KV cache; every approximated head refuses another length
    with an InputError."""
    if not isinstance(plan, Plan):
        plan = read_plan(plan)
    if plan.scope == "whole":  # exact, sink + window and vertical-slash: no fitted map, no statistics
        rows_store = stats = None
    if stats is None and rows_store is not None:
        from eigenattn.spectra.stores import RowStats  # the spectra stage's reader of rows.zarr

        stats = RowStats(rows_store)
    if stats is not None and (stats.model, stats.view, stats.seq_len) != (plan.model, plan.view, plan.seq_len):
        raise InputError(
            "rows_store",
            f"holds {stats.model}/{stats.view} at n = {stats.seq_len}, the plan is for "
            f"{plan.model}/{plan.view} at n = {plan.seq_len}",
            "pass the rows.zarr of the plan's model and view",
        )
    if kernels not in KERNEL_MODES:
        raise InputError("kernels", f"is {kernels!r}", f"use one of {', '.join(KERNEL_MODES)}")
    if kernels == "auto":
        kernels = "compiled" if next(model.parameters()).device.type == "cuda" else "eager"
    plans = layer_plans(plan, stats)
    mods = attention_modules(model)
    bad = sorted(set(plans) - set(mods))
    if bad:
        raise InputError("plan", f"layers {bad} are not attention layers of this model", "apply it to its own model")
    n_heads = int(model.config.num_attention_heads)
    for layer, lp in plans.items():
        if max(lp.heads) >= n_heads:
            raise InputError("plan", f"layer {layer} plans head {max(lp.heads)} of {n_heads}", "apply it to its model")
        missing = sorted(set(range(n_heads)) - set(lp.heads))
        if missing:  # heads the plan does not name run exact attention
            lp.groups.append((torch.tensor(missing, dtype=torch.long), None))
            lp.heads = sorted(lp.heads + missing)
        lp.kernels = kernels
        setattr(mods[layer], PLAN_ATTR, lp)
    if kernels != "dense" and getattr(model.config, "_attn_implementation", None) != PLAN_KERNELS_IMPL:
        model.set_attn_implementation(register_kernels())
        if getattr(model.config, "_attn_implementation", None) != PLAN_KERNELS_IMPL:
            raise InputError(
                type(model).__name__,
                f"could not be switched to the {PLAN_KERNELS_IMPL} attention backend for the real kernels",
                'use kernels="dense" (the dense-mask reference) for this model',
            )
    return plans


def load_for_plans(model_dir, causal: bool, device="cpu"):
    """A pretrained model on the ``partial`` attention backend, in float32 and eval mode."""
    from eigenattn.reconstruction.plugin import load

    return load(model_dir, causal, torch.device(device))


def plan_attention(module, query, key, value, mask, scaling: float, dropout: float, lp: LayerPlan):
    """One layer's attention under its plan (query/key/value: (B, H, n, dh), keys repeated per
    query head; ``mask`` additive, the eager one), by the dense-mask reference."""
    B, H, n, dh = query.shape
    _check_heads(lp, H)
    out = query.new_empty(B, n, H, dh)
    for idx, runner in lp.groups:
        idx = idx.to(query.device)
        q, k, v = query.index_select(1, idx), key.index_select(1, idx), value.index_select(1, idx)
        if runner is None:
            scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
            o, _ = finish_attention(
                module, scores, None if mask is None else mask[..., : k.shape[-2]], v, q.dtype, dropout
            )
        elif isinstance(runner, PeerSpec):
            o, _ = peer_attention(module, q, k, v, mask, scaling, dropout, runner)
        else:
            scores = partial_scores(q, k, runner.to(query.device), scaling)
            o, _ = finish_attention(
                module, scores, None if mask is None else mask[..., : k.shape[-2]], v, q.dtype, dropout
            )
        out[:, :, idx] = o.to(out.dtype)
    return out, None


def _check_heads(lp: LayerPlan, H: int) -> None:
    if lp.heads != list(range(H)):
        raise InputError(
            f"plan of layer {lp.layer}",
            f"covers heads {lp.heads}, the layer has {H}",
            "apply plans with apply_plan (it runs the heads a plan does not name exactly)",
        )


def _check_length(runner, n: int) -> None:
    if runner is not None and n != runner.seq_len:
        name = runner.method if hasattr(runner, "method") else "partial"
        raise InputError(
            f"{name} attention input",
            f"the plan is for seq_len {runner.seq_len}, the input has {n} tokens",
            f"use inputs of exactly {runner.seq_len} tokens (no KV cache)",
        )


_BLOCK_MASKS: dict = {}  # a block mask depends on the shapes and the pattern alone: built once


def _block_mask(key, make):
    """The cached BlockMask for ``key`` (input-independent setup, as clock.py counts it apart)."""
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        if len(_BLOCK_MASKS) >= 64:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        bm = _BLOCK_MASKS[key] = make()
    return bm


def kernel_group(lp: LayerPlan, g: int, q, k, v, scaling: float):
    """The output (B, h, n, dh) of group ``g`` of ``lp`` by its method's real kernel, or None where
    the method has none (the top-k oracle). ``q``, ``k``, ``v``: that group's heads."""
    _, runner = lp.groups[g]
    n = q.shape[-2]
    _check_length(runner, n)
    if runner is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=lp.causal, scale=scaling)
    if isinstance(runner, PartialMap):
        view = {"query_range": (runner.qs.start, runner.qs.stop), "key_range": (runner.ks.start, runner.ks.stop)}
        return K.partial_attention(q, k, v, runner.T, runner.W, runner.bias(), causal=lp.causal, scale=scaling, **view)
    if lp.scope == "whole":  # every query of a causal head (§15): the whole-scope kernels
        compiled = lp.kernels == "compiled"
        if runner.method == "sink_window":
            key = ("whole", n, runner.s, runner.sinks, q.shape[1], str(q.device))
            bm = _block_mask(key, lambda: K.sink_window_block_mask(n, runner.s, runner.sinks, q.shape[1], q.device))
            return K.sink_window_attention(
                q, k, v, runner.s, runner.sinks, scale=scaling, compiled=compiled, block_mask=bm
            )
        if runner.method == "vertical_slash":
            return K.vertical_slash_attention(q, k, v, runner.s, runner.q_last, scale=scaling)
        raise InputError(
            f"plan of layer {lp.layer}", f"{runner.method} is not defined in whole scope", "use view scope"
        )
    view = {"query_range": (runner.qs.start, runner.qs.stop), "key_range": (runner.ks.start, runner.ks.stop)}
    if runner.method == "sink_window":
        key = ("view", n, runner.s, runner.sinks, view["query_range"], view["key_range"], lp.causal, str(q.device))
        bm = _block_mask(
            key,
            lambda: K.sink_window_view_block_mask(n, runner.s, runner.sinks, causal=lp.causal, device=q.device, **view),
        )
        return K.sink_window_view_attention(
            q,
            k,
            v,
            runner.s,
            runner.sinks,
            causal=lp.causal,
            scale=scaling,
            compiled=lp.kernels == "compiled",
            block_mask=bm,
            **view,
        )
    if runner.method == "vertical_slash":
        return K.vertical_slash_view_attention(
            q, k, v, runner.s, runner.q_last, causal=lp.causal, scale=scaling, **view
        )
    if runner.method == "nystrom":
        return K.nystrom_attention(q, k, v, runner.s, pinv=runner.pinv, causal=lp.causal, scale=scaling, **view)
    return None


def plan_kernel_attention(module, query, key, value, scaling: float, lp: LayerPlan):
    """One layer's attention under its plan by the real kernels, for an unpadded batch (the
    model's plain causal or all-visible mask); output (B, n, H, dh) as the attention interface's."""
    B, H, n, dh = query.shape
    _check_heads(lp, H)
    out = query.new_empty(B, n, H, dh)
    for g, (idx, runner) in enumerate(lp.groups):
        idx = idx.to(query.device)
        q, k, v = query.index_select(1, idx), key.index_select(1, idx), value.index_select(1, idx)
        o = kernel_group(lp, g, q, k, v, scaling)
        if o is None:  # no kernel (the top-k oracle): its dense reference under the plain mask
            mask = _additive_mask(None, lp.causal, n, query.dtype, query.device)
            o, _ = peer_attention(module, q, k, v, mask, scaling, 0.0, runner)  # (B, n, h, dh)
        else:
            o = o.transpose(1, 2)
        out[:, :, idx] = o.to(out.dtype)
    return out, None


def _additive_mask(mask, causal: bool, n: int, dtype, device):
    """The eager (additive) mask of a boolean SDPA mask, or of none (plain causal or all-visible)."""
    if mask is None:
        if not causal:
            return None
        keep = torch.ones(n, n, dtype=torch.bool, device=device).tril_()[None, None]
    elif mask.dtype == torch.bool:
        keep = mask
    else:
        return mask
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


_PLAIN: list = [None, False]  # the last mask checked (held, so its id is not reused) and the answer


def _plain(mask, causal: bool, n: int) -> bool:
    """Whether an SDPA mask hides nothing beyond causality: none, or a boolean mask equal to the
    plain causal one (causal) or all True (bidirectional). Checked once per mask tensor."""
    if mask is None:
        return True
    if _PLAIN[0] is mask:
        return _PLAIN[1]
    ok = mask.dtype == torch.bool and mask.shape[-1] == n and mask_is_plain(mask, causal)
    _PLAIN[0], _PLAIN[1] = mask, ok
    return ok


def plan_kernels_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``eigenattn_plan`` attention backend (its masks are SDPA's): a layer with a plan whose
    kernels are real runs them (an unpadded batch; a padded one runs the dense reference); a layer
    carrying any other eigenattn attachment runs the ``partial`` backend with the eager mask; every
    other layer runs ``transformers``' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lp = getattr(module, PLAN_ATTR, None)
    causal = bool(getattr(module, "is_causal", False)) if lp is None else lp.causal
    n = query.shape[-2]
    if lp is not None and lp.kernels != "dense" and _plain(attention_mask, causal, n) and not module.training:
        check_kwargs(module, kwargs, IGNORED_KWARGS, PLAN_KERNELS_IMPL)
        key, value, scaling = expand_heads(query, key, value, scaling)
        return plan_kernel_attention(module, query, key, value, scaling, lp)
    if lp is not None or any(hasattr(module, a) for a in ATTACHMENTS):
        mask = _additive_mask(attention_mask, causal, n, query.dtype, query.device)
        return partial_attention_forward(module, query, key, value, mask, scaling, dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def register_kernels() -> str:
    """Register the ``eigenattn_plan`` attention backend with SDPA's mask (idempotent); return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if PLAN_KERNELS_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(PLAN_KERNELS_IMPL, plan_kernels_forward)
        AttentionMaskInterface.register(PLAN_KERNELS_IMPL, sdpa_mask)
    return PLAN_KERNELS_IMPL


class HeadProbe:
    """Gates and per-head attention statistics of one layer (see the module docstring).

    ``gate``: (H,) ones, requires grad; after a backward pass its ``.grad`` is ∂loss/∂ξ_h. The
    statistics are summed over the view's queries (``query_range``) of every forward pass."""

    def __init__(self, heads: int, query_range, sinks: int, device="cpu"):
        self.gate = torch.ones(heads, device=device, requires_grad=True)
        self.qs = slice(*map(int, query_range))
        self.sinks = int(sinks)
        self.sums = torch.zeros(3, heads, dtype=torch.float64)  # sink mass, diagonal mass, entropy
        self.count = 0

    def record(self, weights: torch.Tensor) -> None:
        w = weights.detach()[:, :, self.qs].double()  # (B, H, q, n)
        q_pos = torch.arange(self.qs.start, self.qs.start + w.shape[2], device=w.device)
        sink = w[..., : self.sinks].sum(-1)
        diag = w.gather(-1, q_pos.view(1, 1, -1, 1).expand(w.shape[0], w.shape[1], -1, 1)).squeeze(-1)
        ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)
        self.sums += torch.stack([sink.sum((0, 2)), diag.sum((0, 2)), ent.sum((0, 2))]).cpu()
        self.count += w.shape[0] * w.shape[2]

    def means(self) -> dict[str, torch.Tensor]:
        m = self.sums / max(self.count, 1)
        return {"sink_mass": m[0], "diagonal_mass": m[1], "entropy": m[2]}
