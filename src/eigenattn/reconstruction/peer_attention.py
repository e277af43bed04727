"""The peers inside a model's forward pass (the plug-in evaluation and the ``nystrom`` training
variant). An attention module carrying a :class:`PeerSpec` as ``eigenattn_peer`` runs its view
block with the peer; everything outside the view stays exact, as for the paper's maps.

- Sparse peers (``topk_oracle``, ``vertical_slash``, ``sink_window``): the view block's scores
  are kept at the peer's s keys per row and set to −inf elsewhere, then the model's mask, the
  softmax and P·V run as in eager attention. The result equals computing only those scores; the
  cost model (:mod:`eigenattn.reconstruction.cost`) charges only those.
- ``nystrom``: the view block's probabilities come from the Q and K of the view (after RoPE and
  the grouped-query repeat) through the landmark kernels; the row's keys outside the view keep
  their exact probabilities, weighted by the landmark estimate of the view's partition function.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from eigenattn.capture.attention import finish_attention
from eigenattn.errors import InputError
from eigenattn.reconstruction.peers import (
    Geometry,
    check_peer,
    nystrom_from_qk,
    sink_window_keys,
    sink_window_whole_keys,
    topk_keys,
)
from eigenattn.reconstruction.peers import vertical_slash_keys as _vertical_slash_keys

PEER_ATTR = "eigenattn_peer"


class PeerSpec:
    """One peer for the view of one layer: ``method`` at ``s`` keys (landmarks for nystrom)."""

    def __init__(self, method, s, *, seq_len, query_range, key_range, causal, q_last, sinks, pinv, key="plugin.peers"):
        self.method, self.s = method, int(s)
        self.seq_len = int(seq_len)
        self.qs, self.ks = slice(*map(int, query_range)), slice(*map(int, key_range))
        q_pos, k_pos = np.arange(self.qs.start, self.qs.stop), np.arange(self.ks.start, self.ks.stop)
        # a causal view whose keys all precede its queries hides nothing (the prefix view)
        self._hides = bool(causal) and self.ks.stop > self.qs.start + 1
        # the check needs the sizes and whether the mask hides keys of the view, not the (nq, d) mask
        check_peer(method, self.s, Geometry(q_pos, k_pos, np.zeros((1, 1), bool) if self._hides else None), key)
        self.q_last, self.sinks, self.pinv = int(q_last), int(sinks), pinv
        self._causal = bool(causal)
        # the (nq, d) masks are built on first use: the real kernels never need them, and at
        # n = 8,192 each would take 67 MB per head group
        self._geometry = None
        self._window_mask = None

    @property
    def geometry(self) -> Geometry:
        if self._geometry is None:
            q_pos, k_pos = np.arange(self.qs.start, self.qs.stop), np.arange(self.ks.start, self.ks.stop)
            visible = k_pos[None, :] <= q_pos[:, None] if self._causal else None
            self._geometry = Geometry(q_pos, k_pos, visible)
        return self._geometry

    def __repr__(self) -> str:
        return f"PeerSpec({self.method}, s={self.s}, queries={self.qs}, keys={self.ks})"

    @property
    def _window(self) -> torch.Tensor:
        """Sink + window's (nq, d) kept keys; in whole causal scope (§15) each row's sinks and
        latest keys up to itself, as the kernel keeps them."""
        if self._window_mask is None:
            g = self.geometry
            whole = self._causal and self.qs == self.ks == slice(0, self.seq_len)
            self._window_mask = (
                sink_window_whole_keys(self.seq_len, self.s, self.sinks)
                if whole
                else sink_window_keys(g.q_pos, g.k_pos, self.s, self.sinks)
            )
        return self._window_mask

    def keep(self, X: torch.Tensor) -> torch.Tensor:
        """The kept keys (…, nq, d) of a sparse peer for view scores X."""
        g = self.geometry
        if self.method == "topk_oracle":
            Xv = X if g.visible is None else X.masked_fill(~torch.from_numpy(g.visible).to(X.device), float("-inf"))
            return topk_keys(Xv, self.s)
        if self.method == "sink_window":
            return self._window.to(X.device).expand(X.shape)
        return _vertical_slash_keys(X, g.q_pos, g.k_pos, self.s, self.q_last, g.visible)


def peer_attention(module, query, key, value, mask, scaling: float, dropout: float, spec: PeerSpec):
    """Attention of one layer with its view block run by ``spec`` (query/key/value: (B, H, n, dh),
    keys already repeated to one per query head)."""
    n = query.shape[-2]
    if n != spec.seq_len or key.shape[-2] != spec.seq_len:
        raise InputError(
            f"{spec.method} attention input",
            f"the peer is set up for seq_len {spec.seq_len}, the input has {n} queries and {key.shape[-2]} keys",
            f"use inputs of exactly {spec.seq_len} tokens (no KV cache)",
        )
    qs, ks = spec.qs, spec.ks
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
    if spec.method != "nystrom":
        view = scores[:, :, qs, ks]
        scores = scores.clone()
        scores[:, :, qs, ks] = view.masked_fill(~spec.keep(view.detach()), float("-inf"))
        return finish_attention(module, scores, mask, value, query.dtype, dropout)
    if mask is not None and bool((mask[..., qs, ks] < 0).any()):
        raise InputError(
            "nystrom attention input",
            "the mask hides keys of the view (padding?); nystrom mixes every key of the view",
            "use unpadded inputs of exactly seq_len tokens",
        )
    logits = scores if mask is None else scores + mask
    weights = F.softmax(logits, dim=-1, dtype=torch.float32)
    P, log_z = nystrom_from_qk(query[:, :, qs].float(), key[:, :, ks].float(), spec.s, scaling, spec.pinv)
    out = logits[:, :, qs].float().clone()
    out[..., ks] = float("-inf")
    alpha = torch.sigmoid(log_z - torch.logsumexp(out, dim=-1))  # 1 when no key lies outside the view
    rows = torch.softmax(out, dim=-1).nan_to_num(0.0) * (1 - alpha)[..., None]
    rows[..., ks] = P * alpha[..., None]
    weights = weights.clone()
    weights[:, :, qs] = rows
    weights = F.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights
