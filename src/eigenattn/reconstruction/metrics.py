"""Metrics of a reconstruction against the exact scores (docs/method.md §6): score errors, and
total variation, KL and top-1 agreement of the model's attention rows."""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("rel_error", "rel_error_centered", "tv", "kl", "top1")


class Reference:
    """The exact side of the metrics for one layer, computed once and shared by every method.

    ``X``: exact view rows (H, m, d). The probabilities are those of the model's whole attention
    row: ``full_rows`` (H, m, n) with the view's keys (``key_slice``) replaced by the
    reconstruction and the other keys exact, under ``allowed`` (m, n; False = masked). Without
    ``full_rows`` the view row is the whole row. Softmax work runs in float32 torch (the metrics
    need no more); the float32 score errors resolve relative errors down to about 1e-7.
    """

    def __init__(
        self,
        X: np.ndarray,
        full_rows: np.ndarray | None = None,
        key_slice: slice | None = None,
        allowed: np.ndarray | None = None,
    ):
        self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.key_slice = key_slice
        self.full = self.X if full_rows is None else torch.from_numpy(np.ascontiguousarray(full_rows, dtype=np.float32))
        self.masked = None if allowed is None else torch.from_numpy(~np.asarray(allowed, dtype=bool))
        exact = self._masked(self.full)
        self.logp = torch.log_softmax(exact, dim=-1)
        self.p = self.logp.exp()
        self.top = exact.argmax(dim=-1)
        xc = self.X - self.X.mean(dim=-1, keepdim=True)
        self.norm = (self.X**2).sum(dim=(-2, -1)).sqrt()
        self.norm_c = (xc**2).sum(dim=(-2, -1)).sqrt()

    def _masked(self, rows):
        return rows if self.masked is None else rows.masked_fill(self.masked, float("-inf"))

    def reconstruct(self, T: np.ndarray, W: np.ndarray, b: np.ndarray):
        """Â = X[..., T] Wᵀ + b for every head (torch float32)."""
        idx = torch.from_numpy(np.asarray(T, dtype=np.int64))[:, None, :].expand(-1, self.X.shape[1], -1)
        A_T = torch.gather(self.X, -1, idx)
        W = torch.from_numpy(np.asarray(W, dtype=np.float32))
        b = torch.from_numpy(np.asarray(b, dtype=np.float32))
        return torch.baddbmm(b[:, None, :], A_T, W.transpose(-1, -2))

    def metrics(self, S_hat) -> dict:
        """rel_error, rel_error_centered, tv, kl (KL(p‖p̂)) and top1 per head, over all rows."""
        S = S_hat if isinstance(S_hat, torch.Tensor) else torch.from_numpy(np.asarray(S_hat, dtype=np.float32))
        S = S.float()
        if bool(torch.isfinite(S).all()):
            err = S - self.X
            rel = (err**2).sum(dim=(-2, -1)).sqrt() / self.norm
            err -= err.mean(dim=-1, keepdim=True)
            rel_c = (err**2).sum(dim=(-2, -1)).sqrt() / self.norm_c
            rel, rel_c = rel.double().numpy(), rel_c.double().numpy()
        else:  # subset_only: no score estimate
            rel = rel_c = np.full(S.shape[:-2], np.nan)
        if self.key_slice is None:
            approx = S
        else:
            approx = self.full.clone()
            approx[..., self.key_slice] = S
        approx = self._masked(approx)
        logq = torch.log_softmax(approx, dim=-1)
        tv = 0.5 * (self.p - logq.exp()).abs().sum(dim=-1)
        kl = torch.where(self.p > 0, self.p * (self.logp - logq), torch.zeros(())).sum(dim=-1)
        top1 = (approx.argmax(dim=-1) == self.top).double()
        return {
            "rel_error": rel,
            "rel_error_centered": rel_c,
            "tv": tv.double().mean(dim=-1).numpy(),
            "kl": kl.double().mean(dim=-1).numpy(),
            "top1": top1.mean(dim=-1).numpy(),
        }
