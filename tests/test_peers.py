"""The peers (nystrom, topk_oracle, vertical_slash, sink_window) and the cost model, against brute
force on small cases, on stored scores and inside a model."""

import numpy as np
import pytest
import torch

from eigenattn.config.settings import Reconstruction
from eigenattn.errors import ConfigError
from eigenattn.reconstruction import cost
from eigenattn.reconstruction.evaluate import evaluate_view
from eigenattn.reconstruction.metrics import Reference
from eigenattn.reconstruction.peers import (
    Geometry,
    estimate,
    estimate_rows,
    iterative_pinv,
    nystrom_from_qk,
    nystrom_from_scores,
    segment_sizes,
    segments,
    sink_window_keys,
    topk_keys,
    vertical_slash_keys,
)
from eigenattn.spectra.stores import run_rows
from synthetic import low_rank_scores, write_store

EVAL = {"ridge": 1e-6, "rank": 0.5, "seed": 0, "eval_rows": None}
PEER_KW = {"q_last": 16, "sinks": 4, "pinv": ("exact", "iterative")}
NYSTROMFORMER_STEPS = 6  # the iterative pseudo-inverse's step count (docs/method.md, "The peers")


def unit_roundoff(dtype) -> float:
    """u = eps/2: the relative error of one rounding in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def iterative_eigenvalues(M: torch.Tensor, sig: torch.Tensor, steps: int) -> torch.Tensor:
    """The eigenvalues eᵢ of I − Z·M after ``steps`` iterative steps, one per singular value σᵢ of M
    (float64, in σ's order; see :func:`predicted_residual`)."""
    e = 1 - sig**2 / (M.abs().sum(-2).amax(-1) * M.abs().sum(-1).amax(-1))[..., None]
    for _ in range(steps):
        e = (3 * e**3 + e**4) / 4
    return e


def predicted_residual(M: torch.Tensor, E: torch.Tensor, pinv: str, dtype, steps: int = NYSTROMFORMER_STEPS):
    """What the residual ``E = I − Z·M`` of the pseudo-inverse Z of M (…, m, m), computed in ``dtype``
    (u: its unit roundoff), must be, from M's SVD M = U·Σ·Vᵀ (float64); and the factor C of the
    rounding allowance, ‖E − prediction‖₂ ≤ C·u·‖M‖₂·‖Z‖₂. The measured E is read only where
    rounding decides the method's outcome.

    - ``iterative`` (Nyströmformer): Z₀ = Mᵀ/(‖M‖₁‖M‖∞), Z ← ¼·Z·(13I − MZ(15I − MZ(7I − MZ))).
      Every Zₖ is h(MᵀM)·Mᵀ, so Eₖ = V·diag(eᵢ)·Vᵀ (and I − M·Zₖ = U·diag(eᵢ)·Uᵀ). Substituting
      MZ = I − F in the step gives F ← ¾F³ + ¼F⁴, so eᵢ = fᵏ(1 − σᵢ²/(‖M‖₁‖M‖∞)) with
      f(e) = (3e³ + e⁴)/4; e₀ ∈ [0, 1) as σ₁² ≤ ‖M‖₁‖M‖∞. Rounding: each step's four products of
      inner size m add at most m·u·‖M‖·‖Zⱼ‖ to E; a later step multiplies that by at most
      f'(1) = 13/4, as much as it multiplies ‖Z‖ in the unconverged directions: C = 4·steps·m.
    - ``exact`` (torch.linalg.pinv: SVD, σᵢ ≤ m·eps·σ₁ dropped, Z = V·Σ⁺·Uᵀ): Z·M is the
      projector onto the kept right singular vectors, E = V·diag(σᵢ dropped)·Vᵀ. Rounding: the
      product V·Σ⁺·Uᵀ is off by at most m·u·|V||Σ⁺||Uᵀ|, of norm ≤ m²·u·‖Z‖; the SVD is backward
      stable, ‖ΔM‖ ≤ p·u·‖M‖ with p taken as 2m² (LAPACK: "a modestly growing function" of m),
      which moves E by ‖ΔM‖·‖Z‖ through each of U and V: C = m² + 4m². A σᵢ within p·u·σ₁ of the
      cut-off may be computed on either side of it: there E's own eigenvalue (0 or 1) is kept."""
    M = M.double()
    m = M.shape[-1]
    _, sig, Vh = torch.linalg.svd(M)
    V = Vh.transpose(-1, -2)
    if pinv == "iterative":
        e, C = iterative_eigenvalues(M, sig, steps), 4 * steps * m
    else:
        u = unit_roundoff(dtype)
        cut, band = m * 2 * u * sig[..., :1], 2 * m**2 * u * sig[..., :1]
        measured = (Vh @ E @ V).diagonal(dim1=-2, dim2=-1).round().clamp(0, 1)
        e = torch.where((sig - cut).abs() <= band, measured, (sig <= cut).double())
        C = 5 * m**2
    return V @ torch.diag_embed(e) @ Vh, C


def check_pseudo_inverse(M: torch.Tensor, Z: torch.Tensor, pinv: str, dtype, steps: int = NYSTROMFORMER_STEPS):
    """Assert that Z (computed in ``dtype`` from M) is the method's pseudo-inverse of M: its residual
    I − Z·M is :func:`predicted_residual`'s up to rounding."""
    M, Z = M.double(), Z.double()
    E = torch.eye(M.shape[-1], dtype=torch.float64) - Z @ M
    predicted, C = predicted_residual(M, E, pinv, dtype, steps)
    gap = torch.linalg.matrix_norm(E - predicted, 2)
    allowed = C * unit_roundoff(dtype) * torch.linalg.matrix_norm(M, 2) * torch.linalg.matrix_norm(Z, 2)
    assert (gap <= allowed).all(), f"{pinv}: |E − predicted| {gap.max():.2e} > {allowed.flatten()[gap.argmax()]:.2e}"


def qk(B=2, H=3, nq=12, d=12, dh=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(B, H, nq, dh, generator=g, dtype=torch.float64)
    K = torch.randn(B, H, d, dh, generator=g, dtype=torch.float64)
    return Q, K, dh**-0.5


def brute_nystrom(Q, K, m, scale):
    """Nyströmformer written out with numpy loops: landmarks as explicit segment means."""
    Q, K = Q.numpy(), K.numpy()
    out = np.empty(Q.shape[:-1] + (K.shape[-2],))
    qe = np.linspace(0, Q.shape[-2], m + 1).round().astype(int)
    ke = np.linspace(0, K.shape[-2], m + 1).round().astype(int)

    def sm(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    for idx in np.ndindex(Q.shape[:-2]):
        q, k = Q[idx], K[idx]
        ql = np.stack([q[qe[i] : qe[i + 1]].mean(0) for i in range(m)])
        kl = np.stack([k[ke[i] : ke[i + 1]].mean(0) for i in range(m)])
        out[idx] = sm(scale * q @ kl.T) @ np.linalg.pinv(sm(scale * ql @ kl.T)) @ sm(scale * ql @ k.T)
    return out


@pytest.mark.parametrize("nq,d,m", [(12, 12, 4), (12, 12, 5), (8, 10, 3), (6, 6, 6)])
def test_nystrom_from_stored_scores_equals_nystrom_from_q_and_k(nq, d, m):
    Q, K, scale = qk(nq=nq, d=d)
    S = scale * Q @ K.transpose(-1, -2)  # a model without bias: S is exactly scale·QKᵀ
    P_s, z_s = nystrom_from_scores(S, m, "exact")
    P_q, z_q = nystrom_from_qk(Q, K, m, scale, "exact")
    np.testing.assert_allclose(P_s.numpy(), P_q.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(z_s.numpy(), z_q.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(P_q.numpy(), brute_nystrom(Q, K, m, scale), atol=1e-8)


def test_nystrom_with_m_equal_n_is_exact_attention():
    Q, K, scale = qk(nq=10, d=10)
    S = scale * Q @ K.transpose(-1, -2)
    P, log_z = nystrom_from_scores(S, 10, "exact")
    np.testing.assert_allclose(P.numpy(), torch.softmax(S, -1).numpy(), atol=1e-10)
    np.testing.assert_allclose(log_z.numpy(), torch.logsumexp(S, -1).numpy(), atol=1e-12)
    P, _ = nystrom_from_qk(Q, K, 10, scale, "exact")
    np.testing.assert_allclose(P.numpy(), torch.softmax(S, -1).numpy(), atol=1e-10)


def test_nystrom_from_scores_is_not_nystrom_once_a_bias_is_added():
    """Why a position bias is refused: segment means of biased scores are not landmark kernels."""
    Q, K, scale = qk(nq=12, d=12)
    S = scale * Q @ K.transpose(-1, -2)
    bias = -0.5 * (torch.arange(12)[:, None] - torch.arange(12)[None, :]).abs().double()  # ALiBi-like
    P_s, _ = nystrom_from_scores(S + bias, 4, "exact")
    assert (P_s - nystrom_from_qk(Q, K, 4, scale, "exact")[0]).abs().max() > 1e-2


def test_iterative_pinv_follows_its_closed_form_and_converges_to_the_exact_one():
    """Each eigenvalue of I − Z·M follows e ← (3e³ + e⁴)/4 (:func:`predicted_residual`); the
    default is Nyströmformer's six steps. Z − pinv(M) = −V·diag(eᵢ/σᵢ)·Uᵀ, so after k steps
    ‖Z − pinv(M)‖₂ ≤ maxᵢ eᵢ/σᵢ, plus rounding: Z's error from E's (C·u·‖M‖‖Z‖, times ‖Z‖) and
    pinv's own (5m²·u·‖M‖‖pinv‖², as in :func:`predicted_residual`)."""
    g = torch.Generator().manual_seed(0)
    M = torch.softmax(2 * torch.randn(16, 6, 6, generator=g, dtype=torch.float64), -1)
    u = unit_roundoff(torch.float64)
    check_pseudo_inverse(M, iterative_pinv(M), "iterative", torch.float64)
    for steps in (3, 40):
        check_pseudo_inverse(M, iterative_pinv(M, steps), "iterative", torch.float64, steps)
    with pytest.raises(AssertionError):  # the check tells six steps from five
        check_pseudo_inverse(M, iterative_pinv(M, 5), "iterative", torch.float64)
    check_pseudo_inverse(M, torch.linalg.pinv(M), "exact", torch.float64)
    Z, exact = iterative_pinv(M, 40), torch.linalg.pinv(M)
    sig = torch.linalg.svdvals(M)
    norm = torch.linalg.matrix_norm
    C = 4 * 40 * 6  # as in predicted_residual: iterative, then exact
    rounding = u * norm(M, 2) * (C * norm(Z, 2) ** 2 + 5 * 6**2 * norm(exact, 2) ** 2)
    bound = (iterative_eigenvalues(M, sig, 40) / sig).amax(-1) + rounding
    assert (norm(Z - exact, 2) <= bound).all()


def test_segments_are_contiguous_means():
    A = segments(10, 3)
    np.testing.assert_allclose(A.sum(axis=1), 1.0)
    assert ((A > 0).sum(axis=0) == 1).all()  # every position in exactly one segment
    assert [int((r > 0).sum()) for r in A] == [3, 4, 3] == list(segment_sizes(10, 3))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("s", [1, 3, 6])
def test_topk_oracle_tv_is_at_most_every_s_key_method(seed, s):
    """Property: keeping each row's s largest scores is the best s-key sparse attention (in TV)."""
    rng = np.random.default_rng(seed)
    nq, d = 10, 12
    X = torch.from_numpy(rng.standard_normal((2, nq, d)) * rng.uniform(0.5, 4))
    ref = Reference(X.numpy())
    g = Geometry(np.arange(nq), np.arange(d))
    kw = {"q_last": 4, "sinks": 2, "pinv": "exact"}
    tv = {m: ref.metrics(estimate(m, X, s, g, **kw)[1])["tv"] for m in ("topk_oracle", "vertical_slash", "sink_window")}
    for _ in range(20):  # random s-key subsets, per row
        keep = torch.zeros(X.shape, dtype=torch.bool)
        keep.scatter_(-1, torch.from_numpy(rng.permuted(np.tile(np.arange(d), (2, nq, 1)), axis=-1)[..., :s]), True)
        tv[f"random{_}"] = ref.metrics(X.masked_fill(~keep, float("-inf")))["tv"]
    # per row as well, not only on the mean
    oracle_rows = 0.5 * (torch.softmax(X, -1) - torch.softmax(estimate("topk_oracle", X, s, g, **kw)[1], -1)).abs().sum(
        -1
    )
    for name, v in tv.items():
        assert (tv["topk_oracle"] <= v + 1e-7).all(), name
    vs = estimate("vertical_slash", X, s, g, **kw)[1]
    vs_rows = 0.5 * (torch.softmax(X, -1) - torch.softmax(vs, -1)).abs().sum(-1)
    assert (oracle_rows <= vs_rows + 1e-6).all()


@pytest.mark.parametrize("nq,d,s,q_last", [(16, 16, 5, 4), (8, 8, 8, 8), (8, 16, 3, 2), (32, 32, 12, 6)])
def test_vertical_slash_attends_to_exactly_s_keys_and_costs_its_formula(nq, d, s, q_last):
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((3, 2, nq, d)))
    q_pos = np.arange(d, d + nq) if nq != d else np.arange(nq)  # a prefix view, or the whole matrix
    keep = vertical_slash_keys(X, q_pos, np.arange(d), s, q_last)
    assert (keep.sum(-1) == s).all()
    # the ⌈s/2⌉ verticals chosen from the last q_last softmax rows are kept in every row
    p = torch.softmax(X[..., nq - q_last :, :], -1).sum(-2)
    top = p.topk(-(-s // 2), dim=-1).indices
    assert torch.gather(keep, -1, top[..., None, :].expand(-1, -1, nq, -1)).all()
    dh = 7
    assert cost.view_macs("vertical_slash", nq=nq, d=d, d_head=dh, s=s, q_last=q_last) == (
        q_last * d * dh + nq * s * dh + nq * s * dh
    )
    # input-dependent: another input gives another pattern
    X2 = torch.from_numpy(rng.standard_normal((3, 2, nq, d)))
    if s < d:
        assert not torch.equal(keep, vertical_slash_keys(X2, q_pos, np.arange(d), s, q_last))


def test_vertical_slash_finds_a_diagonal_and_a_column():
    """Scores with a strong sink column and a strong local diagonal: both patterns are found."""
    n = 24
    X = torch.full((1, n, n), -4.0, dtype=torch.float64)
    X[..., 0] = 5.0
    X[0, torch.arange(1, n), torch.arange(0, n - 1)] = 5.0  # offset 1
    keep = vertical_slash_keys(X, np.arange(n), np.arange(n), 2, 6)
    assert keep[0, :, 0].all()
    assert all(bool(keep[0, i, i - 1]) for i in range(2, n))


def test_sink_window_keeps_the_same_keys_for_every_input():
    g = Geometry(np.arange(16, 32), np.arange(16))  # a prefix view
    rng = np.random.default_rng(0)
    masks = []
    for seed in range(3):
        X = torch.from_numpy(rng.standard_normal((2, 16, 16)) * (seed + 1))
        L = estimate("sink_window", X, 6, g, q_last=4, sinks=4, pinv="exact")[1]
        masks.append(torch.isfinite(L))
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    assert (masks[0].sum(-1) == 6).all()
    # sinks (at most s/2 = 3) and the keys nearest the queries: the end of the prefix
    expect = np.zeros(16, dtype=bool)
    expect[[0, 1, 2, 13, 14, 15]] = True
    assert (masks[0].numpy() == expect).all()
    # the whole matrix: a window around each query
    w = sink_window_keys(np.arange(10), np.arange(10), 5, 1).numpy()
    assert (w.sum(1) == 5).all() and w[:, 0].all() and w[9, [6, 7, 8, 9]].all() and w[5, [3, 4, 5, 6]].all()


def test_topk_keys_respects_ties_and_counts():
    X = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert topk_keys(X, 2).tolist() == [[False, True, True, False]]


def test_cost_model():
    n, dh = 128, 32
    ex = cost.exact_macs(n, n, dh)
    assert ex == 2 * n * n * dh
    # the figure: dense partial at s = 32 costs ×1.125 exact
    assert cost.cost_share("conditional_gaussian", nq=n, d=n, d_head=dh, s=32) == pytest.approx(1.125)
    # the factored eigenspace map (k = 16): n·s·dh + n·s·k + n·k·n + P·V
    assert (
        cost.view_macs("eigenspace", nq=n, d=n, d_head=dh, s=32, k=16)
        == n * 32 * dh + n * 32 * 16 + n * 16 * n + n * n * dh
    )
    assert cost.view_macs("subset_only", nq=n, d=n, d_head=dh, s=16) == 2 * n * 16 * dh
    assert cost.view_macs("topk_oracle", nq=n, d=n, d_head=dh, s=16) == cost.view_macs(
        "sink_window", nq=n, d=n, d_head=dh, s=16
    )
    # nystrom with m = n is dearer than exact; with m ≪ n far cheaper
    assert cost.cost_share("nystrom", nq=n, d=n, d_head=dh, s=n) > 1
    assert cost.cost_share("nystrom", nq=n, d=n, d_head=dh, s=8) < 0.15
    assert cost.family("topk_oracle") == "oracle" and cost.family("nystrom") == "peer"
    assert cost.attention_flops_per_seq("linformer", n, 16, 2, 2, dh) == 4 * n * 16 * dh * 4


@pytest.fixture(scope="module")
def peer_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("peers")
    data = low_rank_scores(30, 2, 2, 16, seed=3)
    fit = write_store(root / "fit.zarr", data[:24])
    held = write_store(root / "held.zarr", data[24:])
    out = {"fit": fit, "held": held}
    for view in ("all", "prefix"):
        run_rows([fit], root / f"{view}-rows.zarr", view, ("raw",), 2)
        out[view] = str(root / f"{view}-rows.zarr")
    mods = [{"softcap": None, "position_bias": True, "sinks": False}] * 2
    out["held_bias"] = write_store(root / "held-bias.zarr", data[24:], modifiers=mods)
    return out


@pytest.mark.parametrize("view", ["all", "prefix"])
def test_peers_in_the_reconstruction_table(peer_stores, view):
    settings = Reconstruction(
        estimators=("conditional_gaussian", "subset_only"),
        strategies=("strided",),
        subset_sizes=(2, 6, 8),
        **EVAL,
        peers=("nystrom", "topk_oracle", "vertical_slash", "sink_window"),
        **PEER_KW,
    )
    df = evaluate_view(
        peer_stores[view], [peer_stores["held"]], settings, fit_shards=[peer_stores["fit"]], progress=False
    )
    peers = df[df.family.isin(["peer", "oracle"])]
    assert set(peers.estimator) == {"nystrom", "topk_oracle", "vertical_slash", "sink_window"}
    assert set(peers.split) == {"fit", "heldout"} and set(peers.strategy) == {"-", "exact", "iterative"}
    assert set(peers[peers.estimator == "nystrom"].strategy) == {"exact", "iterative"}  # its pseudo-inverses
    assert len(peers) == 2 * 2 * 2 * 5 * 3  # splits × layers × heads × (peers, nystrom twice) × s
    assert set(df[df.estimator == "topk_oracle"].family) == {"oracle"}
    sparse = peers[peers.estimator != "nystrom"]
    nq = 16 if view == "all" else 8
    assert sparse.tv.between(0, 1).all() and np.isinf(sparse.kl).any()
    assert peers[peers.subset_size < nq].rel_error.isna().all()  # s = d keeps every score: exact
    # nystrom's P̂ is no distribution (entries can be negative), so its TV is not bounded by 1
    assert (peers[peers.estimator == "nystrom"].tv >= 0).all()
    for r in df.drop_duplicates(["estimator", "subset_size"]).itertuples():
        k = r.k if r.estimator == "eigenspace" else 0
        assert r.attn_macs == cost.view_macs(
            r.estimator, nq=nq, d=nq, d_head=8, s=r.subset_size, k=k, q_last=min(16, nq)
        )
    held = df[(df.split == "heldout") & (df.strategy != "iterative")]
    held = held.groupby(["estimator", "subset_size", "layer", "head"]).tv.first()
    for s in (2, 6, 8):
        for m in ("vertical_slash", "sink_window", "subset_only"):
            name = (m, s) if m != "subset_only" else ("subset_only", s)
            assert (held.loc["topk_oracle", s] <= held.loc[name] + 1e-6).all(), (m, s)
    # nystrom at m = d is exact attention: TV ≈ 0
    full = df[(df.estimator == "nystrom") & (df.strategy == "exact") & (df.subset_size == 8) & (df.split == "heldout")]
    if view == "prefix":
        assert full.tv.max() < 1e-5 and (full.top1 == 1).all()


def test_nystrom_is_refused_or_skipped_on_biased_scores(peer_stores):
    kw = {"estimators": ("mean",), "strategies": ("strided",), "subset_sizes": (2,), **EVAL}
    explicit = Reconstruction(**kw, peers=("nystrom", "sink_window"), peers_explicit=True, **PEER_KW)
    with pytest.raises(ConfigError, match="reconstruction.peers.*position bias"):
        evaluate_view(peer_stores["all"], [peer_stores["held_bias"]], explicit, progress=False)
    auto = Reconstruction(**kw, peers=("nystrom", "sink_window"), peers_explicit=False, **PEER_KW)
    df = evaluate_view(peer_stores["all"], [peer_stores["held_bias"]], auto, progress=False)
    assert "nystrom" not in set(df.estimator) and "sink_window" in set(df.estimator)


def test_a_peer_larger_than_the_view_is_refused(peer_stores):
    bad = Reconstruction(
        estimators=("mean",), strategies=("strided",), subset_sizes=(9,), **EVAL, peers=("nystrom",), **PEER_KW
    )
    with pytest.raises(ConfigError, match="subset"):
        evaluate_view(peer_stores["prefix"], [peer_stores["held"]], bad, progress=False)


# ------------------------------------------------------------------ inside the pretrained models

N_TOK = 24


@pytest.fixture(scope="module", params=["minilm", "smollm2"])
def real_models(request, resources):
    from transformers import AutoModel

    from eigenattn.reconstruction.partial import register

    path = resources / "models" / request.param
    eager = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model = AutoModel.from_pretrained(path, attn_implementation=register(), dtype=torch.float32).eval()
    return request.param, eager, model, request.param == "smollm2"


def specs(model, causal, method, s, pinv="exact"):
    from eigenattn.reconstruction.partial import attention_modules
    from eigenattn.reconstruction.peer_attention import PeerSpec

    n = N_TOK
    qr, kr = ((n // 2, n), (0, n // 2)) if causal else ((0, n), (0, n))
    kw = {"seq_len": n, "query_range": qr, "key_range": kr, "causal": causal, "q_last": 4, "sinks": 2, "pinv": pinv}
    return {layer: PeerSpec(method, s, **kw) for layer in attention_modules(model)}


@torch.inference_mode()
@pytest.mark.parametrize("method", ["nystrom", "topk_oracle", "vertical_slash", "sink_window"])
def test_every_peer_with_all_keys_is_exact_attention_inside_the_model(real_models, method, monkeypatch):
    """A sparse peer that keeps every key runs eager attention's own operations: the hidden states
    agree to float32 rounding (relative to their scale: smollm2's reach ~1e2; measured: equal).
    nystrom with m = d landmarks is exact only up to its float32 pseudo-inverse of an often
    ill-conditioned kernel, and what that leaves in the last hidden state has no bound we can
    state (30 layers amplify it), so it is checked layer by layer (:func:`check_nystrom_layer_is_exact`)."""
    from eigenattn.reconstruction.partial import attach_peers, attention_modules, detach

    name, eager, model, causal = real_models
    x = torch.from_numpy(np.random.default_rng(0).integers(100, 1000, size=(2, N_TOK)))
    want = eager(input_ids=x).last_hidden_state
    d = N_TOK // 2 if causal else N_TOK
    inverses, layers = record_pseudo_inverses(monkeypatch), record_peer_attention(monkeypatch)
    attach_peers(model, specs(model, causal, method, d))
    try:
        got = model(input_ids=x).last_hidden_state
    finally:
        detach(model)
    assert len(layers) == len(attention_modules(model))
    if method == "nystrom":
        assert len(inverses) == len(layers)
        for (M, Z, pinv), call in zip(inverses, layers):
            check_pseudo_inverse(M, Z, pinv, torch.float32)
            check_nystrom_layer_is_exact(M, Z, *call)
    else:
        assert (got - want).abs().max().item() <= 1e-4 + 1e-5 * want.abs().max().item(), name


def record_peer_attention(monkeypatch) -> list:
    """Every peer attention call from now on, in call order (one per layer), as
    (query, key, value, mask, scaling, output, weights)."""
    from eigenattn.reconstruction import partial

    calls, real = [], partial.peer_attention

    def spy(module, query, key, value, mask, scaling, dropout, spec):
        out, weights = real(module, query, key, value, mask, scaling, dropout, spec)
        calls.append((query, key, value, mask, scaling, out, weights))
        return out, weights

    monkeypatch.setattr(partial, "peer_attention", spy)
    return calls


def check_nystrom_layer_is_exact(M, Z, query, key, value, mask, scaling, out, weights):
    """nystrom with one landmark per view position inside one layer, against float64 attention of
    that layer's own query, key and mask: W = softmax(scaling·QKᵀ + mask), and the output W·V.

    With m = d the landmarks are the view's queries and keys, so A = M = B = the view's softmax and
    the view block is P̂ = M·Z·M = M + M·(Z·M − I): off by exactly |M·(Z·M − I)| (computed from the
    recorded M and Z) plus the two products' rounding 2d·u·|M||Z||M|. The landmark log Z is exact
    at m = d, so the view's share α and the keys outside the view are eager attention's. Rounding
    of the rest, per row i: the float32 logits are off by at most Δᵢ = (d_h + 1)·u·scaling·
    maxⱼ |qᵢ|·|kⱼ|, which moves a softmax entry by at most (e^{2Δᵢ} − 1) of itself, and α (a
    sigmoid, slope ≤ 1/4, of two log-sum-exps each off by Δᵢ + (n + 4)·u) by Δᵢ + (n + 4)·u;
    the float32 softmax itself adds (n + 4)·u. The output row then is off by at most
    (the row's bound)·Σⱼ|vⱼ| + n·u·Σⱼ |wᵢⱼ||vⱼ|."""
    u = unit_roundoff(torch.float32)
    Q, K, V = (t.double() for t in (query, key, value))
    n, dh = Q.shape[-2], Q.shape[-1]
    logits = scaling * Q @ K.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask[..., :n].double()
    W_ref = torch.softmax(logits, dim=-1)
    q0, d = n - M.shape[-2], M.shape[-1]  # the view: the last nq queries, the first d keys
    residual = torch.zeros_like(W_ref)
    residual[..., q0:, :d] = (M @ (Z @ M - torch.eye(d, dtype=torch.float64))).abs()
    residual[..., q0:, :d] += 2 * d * u * M.abs() @ Z.abs() @ M.abs()
    delta = (dh + 1) * u * scaling * (Q.abs() @ K.abs().transpose(-1, -2)).amax(-1, keepdim=True)
    bound = residual.amax(-1, keepdim=True) + torch.expm1(2 * delta) + delta + 2 * (n + 4) * u
    W = weights.double()
    assert ((W - W_ref).abs() <= bound).all(), ((W - W_ref).abs() / bound).max()
    out_bound = bound * V.abs().sum(-2, keepdim=True).amax(-1, keepdim=True) + n * u * W.abs() @ V.abs()
    assert ((out.double().transpose(1, 2) - W_ref @ V).abs() <= out_bound).all()


def record_pseudo_inverses(monkeypatch) -> list:
    """Every (M, Z, pinv) that nystrom inverts from now on, in call order (one call per layer)."""
    from eigenattn.reconstruction import peers

    calls, real = [], peers._pinv

    def spy(M, pinv):
        Z = real(M, pinv)
        calls.append((M.detach().double(), Z.detach().double(), pinv))
        return Z

    monkeypatch.setattr(peers, "_pinv", spy)
    return calls


def nystrom_row_sum_bound(M, Z, n: int, d: int, dtype) -> torch.Tensor:
    """The most a row of the model's attention weights may differ from 1 when its view block is
    α·P̂ with P̂ = A·Z·B (A = softmax(QK̃ᵀ), M = softmax(Q̃K̃ᵀ), B = softmax(Q̃Kᵀ), all row-stochastic,
    m landmarks) and its n − d keys outside the view carry (1 − α)·softmax, per (batch, head).

    In exact arithmetic B·1 = 1 and 1 = M·1, so P̂·1 − 1 = A·Z·1 − 1 = A·(Z·M − I)·1, and as A's
    rows are non-negative and sum to 1, |P̂ᵢ·1 − 1| ≤ ρ = ‖(Z·M − I)·1‖∞ ≤ √m·‖I − Z·M‖₂: the
    pseudo-inverse's own residual (0 for an exact inverse of an invertible M; for the iterative one
    check_pseudo_inverse says how large). The row mixes P̂ᵢ·1 and the outside softmax's sum 1 with
    weights α and 1 − α, so it is within ρ of 1 too. Rounding (u: unit roundoff; first order,
    γₖ = k·u): the softmaxes' row sums are off by at most (k + 4)·u (k = m, m, d terms), which Z
    carries as ‖Z‖∞·((d + 4) + (m + 4))·u; the two products of inner size m add 2m·u·‖|A||Z||B|‖∞
    ≤ 2m·u·‖Z‖∞; the α-weighting and the row's float sum over n terms n·u·(1 + ‖Z‖∞):
    τ = (n + d + 4m + 20)·u·(1 + ‖Z‖∞), which also covers ρ's own (m + 4)·u relative error."""
    m = M.shape[-1]
    rho = (Z @ M - torch.eye(m, dtype=torch.float64)).sum(-1).abs().amax(-1)
    z_inf = Z.abs().sum(-1).amax(-1)
    return rho + (n + d + 4 * m + 20) * unit_roundoff(dtype) * (1 + z_inf)


@torch.inference_mode()
@pytest.mark.parametrize(
    "method,pinv",
    [
        ("nystrom", "exact"),
        ("nystrom", "iterative"),
        ("topk_oracle", "exact"),
        ("vertical_slash", "exact"),
        ("sink_window", "exact"),
    ],
    ids=["nystrom", "nystrom-iterative", "topk_oracle", "vertical_slash", "sink_window"],
)
def test_peers_inside_the_model_change_only_the_view(real_models, method, pinv, monkeypatch):
    """Rows outside the view are the eager ones; every row sums to 1 (float32 rounding for the
    sparse peers: a softmax over n keys is off by at most (n + 4)·u ≈ 2e-6 < 1e-5). nystrom's
    rows sum to 1 only up to its pseudo-inverse's residual (:func:`nystrom_row_sum_bound`), and
    that pseudo-inverse must be the method's (:func:`check_pseudo_inverse`)."""
    from eigenattn.reconstruction.partial import attach_peers, detach

    name, eager, model, causal = real_models
    x = torch.from_numpy(np.random.default_rng(1).integers(100, 1000, size=(2, N_TOK)))
    want = eager(input_ids=x, output_attentions=True).attentions
    s = 4
    inverses = record_pseudo_inverses(monkeypatch)
    attach_peers(model, specs(model, causal, method, s, pinv))
    try:
        out = model(input_ids=x, output_attentions=True)
    finally:
        detach(model)
    n = N_TOK
    q0, k1 = (n // 2, n // 2) if causal else (0, n)
    assert len(inverses) == (len(out.attentions) if method == "nystrom" else 0)
    for layer, (w_peer, w_exact) in enumerate(zip(out.attentions, want)):
        assert torch.isfinite(w_peer).all()
        np.testing.assert_allclose(w_peer[:, :, :q0].numpy(), w_exact[:, :, :q0].numpy(), atol=1e-5)
        row_error = (w_peer.double().sum(-1) - 1).abs()
        if method == "nystrom":
            M, Z, used = inverses[layer]
            assert used == pinv
            check_pseudo_inverse(M, Z, pinv, w_peer.dtype)
            bound = nystrom_row_sum_bound(M, Z, n, k1, w_peer.dtype)
            assert (row_error[..., q0:] <= bound[..., None]).all(), (
                name,
                layer,
                (row_error[..., q0:].amax(-1) / bound).max(),
            )
            assert (row_error[..., :q0] <= 1e-5).all()
        else:
            assert (row_error <= 1e-5).all()
        block = w_peer[:, :, q0:, :k1]
        if method != "nystrom":
            kept = (block > 0).sum(-1)  # a kept key's weight can underflow to 0 in float32
            assert (kept <= s).all() and (kept == s).float().mean() > 0.9, (name, method)
            if causal and layer == 0:  # layer 0's keys after the view stay exact up to the view's weight
                rest_p, rest_e = w_peer[:, :, q0:, k1:], w_exact[:, :, q0:, k1:]
                ratio = rest_p.sum(-1) / rest_e.sum(-1)
                np.testing.assert_allclose((rest_p / ratio[..., None]).numpy(), rest_e.numpy(), atol=1e-5)
    assert (out.last_hidden_state - eager(input_ids=x).last_hidden_state).abs().max() > 1e-3


@pytest.mark.parametrize("prefix", [False, True])
def test_estimates_for_chosen_rows_equal_the_whole_block(prefix):
    """The evaluation computes each peer for its chosen rows only; they must be the whole block's."""
    rng = np.random.default_rng(4)
    c, H, n = 3, 2, 12
    X = torch.from_numpy(rng.standard_normal((c, H, n, n)) * 2)
    g = Geometry(np.arange(n, 2 * n), np.arange(n)) if prefix else Geometry(np.arange(n), np.arange(n))
    seq, q = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 11, 5, 3, 4, 10])
    kw = {"q_last": 4, "sinks": 2, "pinv": "exact"}
    for m in ("nystrom", "topk_oracle", "vertical_slash", "sink_window"):
        for s in (1, 3, 6, 12):
            whole = estimate(m, X, s, g, **kw)
            rows = estimate_rows(m, X, s, g, seq, q, **kw)
            assert whole[0] == rows[0]
            for a, b in zip(whole[1:], rows[1:]):
                np.testing.assert_allclose(b.numpy(), a[seq, :, q].numpy(), atol=1e-10, err_msg=f"{m} s={s}")


def test_landmark_partition_function_is_calibrated_by_the_landmark_queries():
    """The view's share of a row (prefix view) needs log Z of the view; the plain landmark estimate
    is low (Jensen), badly so with a sink key; the calibrated one is close, and exact at m = n."""
    rng = np.random.default_rng(2)
    n, m = 32, 4
    S = torch.from_numpy(rng.standard_normal((200, 1, n, n)))
    S[..., 0] += 6.0  # an attention sink inside the view
    P, log_z = nystrom_from_scores(S, m, "exact")
    exact = torch.logsumexp(S, -1)
    counts = torch.from_numpy(segment_sizes(n, m))
    plain = torch.logsumexp(S @ torch.from_numpy(segments(n, m)).T + torch.log(counts), -1)
    assert (plain <= exact + 1e-12).all()  # Jensen: the plain estimate is a lower bound
    assert (log_z - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()
    _, z_full = nystrom_from_scores(S, n, "exact")
    np.testing.assert_allclose(z_full.numpy(), exact.numpy(), atol=1e-10)
