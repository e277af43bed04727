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

    def metrics_probs(self, P_view, log_z) -> dict:
        """The metrics of a method that estimates the view block's probabilities directly (nystrom):
        ``P_view`` (H, m, d), rows normalised within the view, and ``log_z`` (H, m) its estimate of
        the view's log partition function. Keys outside the view stay exact: the row is
        ``[α̂·P̂_view, (1−α̂)·p_out]`` with ``α̂ = Ẑ / (Ẑ + Z_out)``. No scores are estimated (score
        errors NaN); entries of P̂ can be negative, so KL is infinite wherever P̂ ≤ 0 under p > 0."""
        P_view = torch.as_tensor(P_view).float()
        if self.key_slice is None:
            q = P_view
        else:
            out = self._masked(self.full.clone())
            out[..., self.key_slice] = float("-inf")
            lse_out = torch.logsumexp(out, dim=-1)
            alpha = torch.sigmoid(torch.as_tensor(log_z).float() - lse_out)  # Ẑ/(Ẑ+Z_out); 1 if nothing is outside
            q = torch.softmax(out, dim=-1).nan_to_num(0.0) * (1 - alpha)[..., None]
            q[..., self.key_slice] = P_view * alpha[..., None]
        tv = 0.5 * (self.p - q).abs().sum(dim=-1)
        bad = ((self.p > 0) & (q <= 0)).any(dim=-1)
        kl = torch.where(self.p > 0, self.p * (self.logp - q.clamp_min(1e-38).log()), torch.zeros(())).sum(dim=-1)
        kl = kl.masked_fill(bad, float("inf"))
        top1 = (q.argmax(dim=-1) == self.top).double()
        nan = np.full(q.shape[:-2], np.nan)
        return {
            "rel_error": nan,
            "rel_error_centered": nan.copy(),
            "tv": tv.double().mean(dim=-1).numpy(),
            "kl": kl.double().mean(dim=-1).numpy(),
            "top1": top1.mean(dim=-1).numpy(),
        }
