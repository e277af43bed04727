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

:class:`HeadProbe` sets a gate ξ_h = 1 on every head's output (for the first-order sensitivity
∂loss/∂ξ_h) and records each head's attention mass on the sink keys and on the diagonal and its
entropy, over the view's queries.
"""

from __future__ import annotations

import torch

from eigenattn.capture.attention import finish_attention
from eigenattn.errors import InputError
from eigenattn.reconstruction.partial import PLAN_ATTR, attention_modules, fit_map, partial_scores
from eigenattn.reconstruction.peer_attention import PeerSpec, peer_attention
from eigenattn.reconstruction.plans import EXACT, Plan, is_peer, read_plan


class LayerPlan:
    """The groups of one layer's plan: (head indices, runner) with runner a PeerSpec, a PartialMap or None (exact)."""

    def __init__(self, layer: int, groups: list):
        self.layer = layer
        self.groups = groups
        self.heads = sorted(int(h) for idx, _ in groups for h in idx.tolist())

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
        out[layer] = LayerPlan(layer, groups)
    return out


def apply_plan(model, plan, rows_store=None, stats=None) -> dict[int, LayerPlan]:
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

    **Inputs must be exactly ``plan.seq_len`` tokens** (the sampled passages' length,
    ``sampling.seq_len``): the view's query and key ranges, the subset positions of the paper
    estimators and the peers' windows are fixed positions of a sequence of that length. Tokenise
    each passage with the model's tokenizer, truncated to ``seq_len`` and without padding (as
    :func:`eigenattn.corpus.passages.tokenize_passages` does), and call ``model(input_ids=ids)`` with
    ``ids`` of shape (batch, seq_len), no KV cache; every approximated head refuses another length
    with an InputError."""
    if not isinstance(plan, Plan):
        plan = read_plan(plan)
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
        setattr(mods[layer], PLAN_ATTR, lp)
    return plans


def load_for_plans(model_dir, causal: bool, device="cpu"):
    """A pretrained model on the ``partial`` attention backend, in float32 and eval mode."""
    from eigenattn.reconstruction.plugin import load

    return load(model_dir, causal, torch.device(device))


def plan_attention(module, query, key, value, mask, scaling: float, dropout: float, lp: LayerPlan):
    """One layer's attention under its plan (query/key/value: (B, H, n, dh), keys repeated per query head)."""
    B, H, n, dh = query.shape
    if lp.heads != list(range(H)):
        raise InputError(
            f"plan of layer {lp.layer}",
            f"covers heads {lp.heads}, the layer has {H}",
            "apply plans with apply_plan (it runs the heads a plan does not name exactly)",
        )
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
