"""Reconstruction estimators, strategies and metrics against numpy/scipy and brute force."""

import numpy as np
import pytest
import torch

from eigenattn.config.settings import Reconstruction
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.estimators import ESTIMATORS, STRATEGIES, apply, fit, linear_map, select_subset
from eigenattn.reconstruction.evaluate import evaluate_view
from eigenattn.reconstruction.metrics import Reference
from eigenattn.reconstruction.partial import PartialMap, partial_scores
from eigenattn.spectra.rows import eigh_desc
from eigenattn.spectra.stores import run_rows
from synthetic import low_rank_scores, write_store

d = 24
KW = {"ridge": 1e-6, "rank": 0.5, "seed": 0}
EVAL = {**KW, "eval_rows": None}


def gaussian(d=d, seed=0, decay=0.8):
    """Mean, covariance with a decaying spectrum, and its eigen decomposition."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = 5.0 * decay ** np.arange(d)
    C = (Q * lam) @ Q.T
    mean = rng.standard_normal(d)
    w, U = eigh_desc(C)
    return mean, C, U, w


def mse(W, b, T, mean, C):
    """Exact expected squared error E‖W a_T + b − a‖² of a linear estimator for a ~ N(mean, C)."""
    P = np.zeros((len(T), len(mean)))
    P[np.arange(len(T)), T] = 1.0
    A = W @ P - np.eye(len(mean))
    bias = W @ mean[T] + b - mean
    return float(np.trace(A @ C @ A.T) + bias @ bias)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_s_equal_d_is_exact(estimator, strategy):
    mean, C, U, lam = gaussian()
    X = np.random.default_rng(1).multivariate_normal(mean, C, size=50)
    m = fit(estimator, strategy, d, mean, U, lam, **KW)
    assert np.array_equal(m.T, np.arange(d))
    assert np.abs(apply(X, m.T, m.W, m.b) - X).max() <= 1e-6


def test_conditional_gaussian_is_the_analytical_conditional_mean_and_beats_eigenspace():
    mean, C, U, lam = gaussian(seed=2)
    rng = np.random.default_rng(3)
    for s in (2, 5, 8, 12, 20):
        for strategy in STRATEGIES:
            T = select_subset(strategy, d, s, U, seed=s)
            Tb = np.setdiff1d(np.arange(d), T)
            a = rng.multivariate_normal(mean, C)
            W, b = linear_map("conditional_gaussian", T, mean, U, lam, ridge=0.0, rank=0.5)[1:3]
            expected = mean[Tb] + C[np.ix_(Tb, T)] @ np.linalg.solve(C[np.ix_(T, T)], a[T] - mean[T])
            got = W @ a[T] + b
            np.testing.assert_allclose(got[Tb], expected, rtol=1e-8, atol=1e-8)
            np.testing.assert_allclose(got[T], a[T], atol=1e-12)
            # MMSE: never worse than eigenspace (or the mean) on the same subset, in exact expectation
            cg = mse(W, b, T, mean, C)
            for other in ("eigenspace", "mean"):
                W2, b2 = linear_map(other, T, mean, U, lam, ridge=1e-6, rank=0.5)[1:3]
                assert cg <= mse(W2, b2, T, mean, C) * (1 + 1e-9) + 1e-12
    # and empirically on samples
    X = rng.multivariate_normal(mean, C, size=4000)
    T, W, b = fit("conditional_gaussian", "pivoted_qr", 6, mean, U, lam, ridge=0.0, rank=0.5, seed=0)[:3]
    T2, W2, b2 = fit("eigenspace", "pivoted_qr", 6, mean, U, lam, **KW)[:3]
    assert ((apply(X, T, W, b) - X) ** 2).mean() <= ((apply(X, T2, W2, b2) - X) ** 2).mean()


@pytest.mark.parametrize("rank,s", [(3, 3), (3, 6), (5, 8), (4, 9)])
def test_exact_on_low_rank_rows(rank, s):
    """Rows of rank r are recovered exactly by the conditional Gaussian when r <= s, and by the
    eigenspace estimator when r <= its k = floor(s/2)."""
    rng = np.random.default_rng(rank * 10 + s)
    V = rng.standard_normal((d, rank))
    mu = rng.standard_normal(d)
    X = mu + rng.standard_normal((400, rank)) @ V.T
    mean = X.mean(0)
    lam, U = eigh_desc(np.cov(X.T))
    fresh = mu + rng.standard_normal((50, rank)) @ V.T
    m = fit("conditional_gaussian", "pivoted_qr", s, mean, U, lam, ridge=1e-12, rank=0.5, seed=0)
    assert np.abs(apply(fresh, m.T, m.W, m.b) - fresh).max() <= 1e-5 * np.abs(fresh).max()
    m = fit("eigenspace", "pivoted_qr", s, mean, U, lam, ridge=1e-12, rank=0.5, seed=0)
    assert m.k == s // 2 and np.isfinite(m.basis_condition) and np.isfinite(m.solve_condition)
    err = np.abs(apply(fresh, m.T, m.W, m.b) - fresh).max() / np.abs(fresh).max()
    assert (err <= 1e-5) == (rank <= s // 2), err


def _pinv_eigenspace(T, mean, U):
    """The unregularised estimator with k = s: U_s (U_s[T])⁺, the old default (for comparison)."""
    Us = U[:, : len(T)]
    W = Us @ np.linalg.pinv(Us[T])
    return W, mean - W @ mean[T]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_regularised_eigenspace_error_falls_with_s(strategy):
    """Exact expected error on a slowly decaying spectrum: the regularised eigenspace estimator
    improves as more keys are computed, while the plain pseudo-inverse with k = s is worse at
    every s, because U_s[T] is ill-conditioned."""
    D = 64
    mean, C, U, lam = gaussian(D, seed=4, decay=0.95)
    sizes = [4, 8, 16, 32]
    reg, old = [], []
    for s in sizes:
        m = fit("eigenspace", strategy, s, mean, U, lam, **{**KW, "seed": 1})
        reg.append(mse(m.W, m.b, m.T, mean, C))
        old.append(mse(*_pinv_eigenspace(m.T, mean, U), m.T, mean, C))
        # the weighted ridge bounds the system's conditioning by the eigenvalue range over σ²
        sigma2 = lam[m.k :].sum() / (D - m.k)
        assert m.solve_condition <= (lam[0] * s + sigma2) / sigma2
    assert all(b <= a * (1 + 1e-9) for a, b in zip(reg, reg[1:])), reg
    assert all(o > r for o, r in zip(old, reg)), (old, reg)
    base = fit("mean", strategy, 32, mean, U, lam, **{**KW, "seed": 1})
    assert reg[-1] < mse(base.W, base.b, base.T, mean, C)


def test_strategies():
    _, _, U, _ = gaussian()
    assert list(select_subset("strided", 16, 4, seed=0)) == [2, 6, 10, 14]
    r1 = select_subset("random", d, 5, seed=3, key=(1, 2))
    assert np.array_equal(r1, select_subset("random", d, 5, seed=3, key=(1, 2)))
    assert not np.array_equal(r1, select_subset("random", d, 5, seed=3, key=(1, 3)))
    for st in STRATEGIES:
        T = select_subset(st, d, 7, U, seed=0)
        assert len(np.unique(T)) == 7 and T.min() >= 0 and T.max() < d and np.all(np.diff(T) > 0)
    # pivoted QR picks the coordinates the top eigenvectors live on
    U1 = np.eye(d)[:, [5, 9, 1] + [i for i in range(d) if i not in (5, 9, 1)]]
    assert list(select_subset("pivoted_qr", d, 3, U1, seed=0)) == [1, 5, 9]


def test_bad_method_inputs():
    mean, C, U, lam = gaussian()
    with pytest.raises(ConfigError, match=r"'reconstruction.subset_sizes': subset size s=25 is outside 1..d=24"):
        fit("eigenspace", "strided", d + 1, mean, U, lam, **KW)
    with pytest.raises(ConfigError, match=r"'reconstruction.estimators': unknown estimator 'pca'"):
        fit("pca", "strided", 4, mean, U, lam, **KW)
    with pytest.raises(ConfigError, match=r"'reconstruction.strategies': unknown strategy 'greedy'"):
        fit("eigenspace", "greedy", 4, mean, U, lam, **KW)


def brute_metrics(S, S_hat, full=None, ks=None, allowed=None):
    """Row-by-row loops in numpy float64."""
    H = S.shape[0]
    out = {k: [] for k in ("rel_error", "tv", "kl", "top1")}
    for h in range(H):
        out["rel_error"].append(
            np.linalg.norm(S_hat[h] - S[h]) / np.linalg.norm(S[h]) if np.isfinite(S_hat).all() else np.nan
        )
        tv, kl, top = [], [], []
        for i in range(S.shape[1]):
            e = S[h, i].copy() if full is None else full[h, i].copy()
            a = S_hat[h, i].copy() if full is None else full[h, i].copy()
            if full is not None:
                a[ks] = S_hat[h, i]
            if allowed is not None:
                e[~allowed[i]] = -np.inf
                a[~allowed[i]] = -np.inf
            p = np.exp(e - e.max())
            p /= p.sum()
            q = np.exp(a - a.max())
            q /= q.sum()
            tv.append(0.5 * np.abs(p - q).sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                kl.append(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)))
            top.append(np.argmax(e) == np.argmax(a))
        for k, v in (("tv", tv), ("kl", kl), ("top1", top)):
            out[k].append(np.mean(v))
    return {k: np.array(v) for k, v in out.items()}


def test_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    H, m, n = 2, 30, 10
    full = rng.standard_normal((H, m, n)) * 2
    ks = slice(0, 5)
    S = full[..., ks]
    S_hat = S + 0.3 * rng.standard_normal(S.shape)
    allowed = np.tril(np.ones((m, n), dtype=bool), k=6)[:m]
    allowed[:, :5] = True
    for args in [(None, None, None), (full, ks, None), (full, ks, allowed)]:
        got = Reference(S, *args).metrics(S_hat)
        want = brute_metrics(S, S_hat, *args)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # subset_only: -inf outside T gives NaN score errors and infinite KL
    S_sub = np.where(np.arange(5) < 2, S, -np.inf)
    got = Reference(S, full, ks).metrics(S_sub)
    assert np.isnan(got["rel_error"]).all() and np.isinf(got["kl"]).all()
    np.testing.assert_allclose(got["tv"], brute_metrics(S, S_sub, full, ks)["tv"], rtol=1e-4)


def test_partial_scores_against_numpy():
    torch.manual_seed(0)
    B, H, n, dh = 2, 3, 12, 8
    q, k = torch.randn(B, H, n, dh, dtype=torch.float64), torch.randn(B, H, n, dh, dtype=torch.float64)
    S = (q @ k.transpose(-1, -2) * 0.3).numpy()
    rng = np.random.default_rng(0)
    for qr, kr in [((0, n), (0, n)), ((6, n), (0, 6))]:
        dv, s = kr[1] - kr[0], 4
        T = np.stack([np.sort(rng.choice(dv, s, replace=False)) for _ in range(H)])
        W, b = rng.standard_normal((H, dv, s)), rng.standard_normal((H, dv))
        pm = PartialMap(T, W, b, seq_len=n, query_range=qr, key_range=kr).double()
        got = partial_scores(q, k, pm, 0.3).detach().numpy()
        qs, ks = slice(*qr), slice(*kr)
        want = S.copy()
        want[:, :, qs, ks] = apply(S[:, :, qs, ks], T[None], pm.W.detach().numpy(), pm.bias().detach().numpy())
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(InputError, match="fitted for seq_len 12"):
        partial_scores(q[:, :, :10], k[:, :, :10], pm, 0.3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """rows.zarr fitted at n=16 (two models, both views), and held-out shards at n=16 and n=20."""
    root = tmp_path_factory.mktemp("recon")
    out = {}
    for i, name in enumerate(["ma", "mb"]):
        data = low_rank_scores(30, 3, 2, 16, seed=i)  # one distribution: fit on 24, hold out 6
        fit_store = write_store(root / f"{name}-fit.zarr", data[:24], model=name)
        out[name] = {"held": write_store(root / f"{name}-held.zarr", data[24:], model=name), "fit": fit_store}
        for view in ("all", "prefix"):
            p = root / f"{name}-{view}-rows.zarr"
            run_rows([fit_store], p, view, ("raw",), 2)
            out[name][view] = str(p)
    out["held20"] = write_store(root / "held20.zarr", low_rank_scores(4, 3, 2, 20, seed=5))
    return out


def test_evaluate_view_table(stores):
    settings = Reconstruction(
        estimators=ESTIMATORS,
        strategies=STRATEGIES,
        subset_sizes=(2, 6),
        **EVAL,
        transfer=("adjacent_layer", "farthest_layer", "other_model"),
        transfer_estimators=("conditional_gaussian",),
        other_models=("mb",),
    )
    df = evaluate_view(
        stores["ma"]["prefix"],
        [stores["ma"]["held"]],
        settings,
        fit_shards=[stores["ma"]["fit"]],
        other_stores=dict(zip(settings.other_models, [stores["mb"]["prefix"]])),
        progress=False,
    )
    assert list(df.columns) == [
        "model",
        "view",
        "split",
        "layer",
        "head",
        "estimator",
        "strategy",
        "subset_size",
        "basis_source",
        "k",
        "basis_condition",
        "solve_condition",
        "rel_error",
        "rel_error_centered",
        "tv",
        "kl",
        "top1",
        "family",
        "attn_macs",
        "cost_share",
    ]
    assert set(df[df.basis_source != "same"].split) == {"heldout"}
    fitted = df[df.split == "fit"]
    assert len(fitted) == 3 * 2 * len(ESTIMATORS) * len(STRATEGIES) * 2
    df = df[df.split == "heldout"]
    same = df[df.basis_source == "same"]
    assert len(same) == 3 * 2 * len(ESTIMATORS) * len(STRATEGIES) * 2
    eig = same[same.estimator == "eigenspace"]
    assert (eig.k == eig.subset_size // 2).all() and (eig.basis_condition >= 1).all()
    assert same[same.estimator == "conditional_gaussian"].solve_condition.ge(1).all()
    assert same[same.estimator == "mean"].solve_condition.isna().all()
    assert set(df.basis_source) == {"same", "layer:1", "layer:2", "layer:0", "model:mb"}
    assert set(df[df.basis_source != "same"].estimator) == {"conditional_gaussian"}
    # layer 0: adjacent is 1, farthest is 2; layer 2: adjacent 1, farthest 0
    assert set(df[df.layer == 0].basis_source) == {"same", "layer:1", "layer:2", "model:mb"}
    assert set(df[df.layer == 2].basis_source) == {"same", "layer:1", "layer:0", "model:mb"}
    assert same.tv.between(0, 1).all() and same.top1.between(0, 1).all()
    sub = same[same.estimator == "subset_only"]
    assert sub.rel_error.isna().all() and np.isinf(sub.kl).all()
    # on low-rank rows the conditional Gaussian at s=6 beats attending to the subset alone
    cg = same[(same.estimator == "conditional_gaussian") & (same.subset_size == 6)]
    so = sub[sub.subset_size == 6]
    assert cg.tv.median() < so.tv.median()
    assert (cg.rel_error < 0.5).all()


def test_statistics_from_another_seq_len(stores):
    with pytest.raises(InputError, match="fitted at seq_len 16.*seq_len 20"):
        evaluate_view(
            stores["ma"]["all"],
            [stores["held20"]],
            Reconstruction(estimators=("mean",), strategies=("strided",), subset_sizes=(2,), **EVAL),
            progress=False,
        )
    with pytest.raises(ConfigError, match="'reconstruction.subset_sizes': subset size s=9 is outside"):
        evaluate_view(
            stores["ma"]["prefix"],
            [stores["ma"]["held"]],
            Reconstruction(estimators=("mean",), strategies=("strided",), subset_sizes=(9,), **EVAL),
            progress=False,
        )


@pytest.mark.parametrize("view,causal", [("all", False), ("prefix", True)])
def test_layer_reference_reads_only_the_chosen_rows(view, causal):
    """Streaming one chunk of sequences at a time gives the rows of the whole-layer reshape."""
    import dask.array as da

    from eigenattn.config.views import view_slices
    from eigenattn.reconstruction.evaluate import _layer_reference, eval_row_index

    rng = np.random.default_rng(1)
    N, L, H, n = 7, 2, 3, 8
    S = rng.standard_normal((N, L, H, n, n)).astype(np.float16)
    qs, ks = view_slices(view, n, causal)
    allowed = np.arange(n)[None, :] <= np.arange(qs.start, qs.stop)[:, None]
    nq = qs.stop - qs.start
    for eval_rows in (None, 5, N * nq - 1):
        ref, _ = _layer_reference(da.from_array(S, chunks=(3, 1, H, n, n)), 1, qs, ks, allowed, causal, eval_rows)
        whole = S[:, 1, :, qs, :].transpose(1, 0, 2, 3).reshape(H, N * nq, n).astype(np.float64)
        pick = eval_row_index(N * nq, eval_rows) if eval_rows else np.arange(N * nq)
        np.testing.assert_array_equal(ref.X.numpy(), whole[:, pick][..., ks].astype(np.float32))
        np.testing.assert_array_equal(ref.full.numpy(), whole[:, pick].astype(np.float32))
        if causal:
            np.testing.assert_array_equal(ref.masked.numpy(), ~np.tile(allowed, (N, 1))[pick])
