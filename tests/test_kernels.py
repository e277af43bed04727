"""Real kernels (docs/method.md, "Cost by the clock"): each equals its dense-mask reference within 1e-5 in float32,
the blocks each touches equal a brute-force count over its dense mask, and the clock's table holds
its three axes. The references are the project's own (peers.py, peer_attention.py, partial.py)."""

import itertools

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from eigenattn.reconstruction import clock, kernels
from eigenattn.reconstruction.partial import PartialMap, partial_scores
from eigenattn.reconstruction.peer_attention import PeerSpec, peer_attention
from eigenattn.reconstruction.peers import masked_logits, nystrom_from_qk, sink_window_keys, vertical_slash_keys

TOL = 1e-5
BACKENDS = itertools.count()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def qkv(n, H=3, dh=16, seed=0, structured=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, n, dh, generator=g) for _ in range(3))
    if structured:  # a smooth position code in Q and K: strong local diagonals, as in real heads
        pos = torch.arange(n)[:, None] / (1.5 ** torch.arange(dh // 2))[None, :]
        P = torch.cat([pos.sin(), pos.cos()], dim=-1)
        q, k = q + 2.0 * P, k + 2.0 * P
    return q, k, v


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def dense(q, k, v, keep, scale=None):
    """softmax(masked_logits(S, keep))·V: the dense-mask form every sparse reference takes."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.softmax(masked_logits(S, keep), dim=-1) @ v


def brute_blocks(keep, block=kernels.BLOCK):
    """(…, nb, nb): a key block counts for a query block when any of its rows keeps any of its keys."""
    n = keep.shape[-1]
    nb = -(-n // block)
    pad = F.pad(keep, (0, nb * block - n, 0, nb * block - n))
    return pad.reshape(*keep.shape[:-2], nb, block, nb, block).any(-1).any(-2)


def causal_mask_additive(n):
    return torch.zeros(1, 1, n, n).masked_fill(~causal(n), float("-inf"))


class Module(torch.nn.Module):
    pass


# --- sink + window ------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 8, 41])
def test_sink_window_whole_mask_is_the_reference_row_by_row(s):
    n, sinks = 150, 4
    mask = kernels.sink_window_whole_keys(n, s, sinks)
    for i in range(n):
        row = sink_window_keys(np.array([i]), np.arange(i + 1), min(s, i + 1), sinks)[0]
        assert torch.equal(mask[i, : i + 1], row), i
        assert not mask[i, i + 1 :].any()


@pytest.mark.parametrize("n", [130, 257, 384])
def test_sink_window_kernel_equals_dense_mask(n):
    q, k, v = qkv(n)
    s_heads, sinks = [1, 20, 100], 4
    out = kernels.sink_window_attention(q, k, v, s_heads, sinks)
    for h, s in enumerate(s_heads):
        ref = dense(q[:, h], k[:, h], v[:, h], kernels.sink_window_whole_keys(n, s, sinks))
        assert (out[:, h] - ref).abs().max() < TOL
    bm = kernels.sink_window_block_mask(n, s_heads, sinks, len(s_heads))
    got = kernels.blockmask_blocks(bm)[0]
    for h, s in enumerate(s_heads):
        assert int(got[h]) == int(brute_blocks(kernels.sink_window_whole_keys(n, s, sinks)).sum())


def test_sink_window_compiled_path_agrees():
    """One compile at a tiny shape: the fused kernel computes what eager FlexAttention computes."""
    q, k, v = qkv(256, H=2)
    with torch.inference_mode():
        fused = kernels.sink_window_attention(q, k, v, [16, 40], 4, compiled=True)
    eager = kernels.sink_window_attention(q, k, v, [16, 40], 4)
    assert (fused - eager).abs().max() < TOL


@pytest.mark.parametrize("view", ["prefix", "all"])
def test_sink_window_view_equals_peer_attention(view):
    n, s, sinks = 260, 12, 4
    q, k, v = qkv(n)
    is_causal = view == "prefix"
    qr, kr = ((n // 2, n), (0, n // 2)) if is_causal else ((0, n), (0, n))
    spec = PeerSpec(
        "sink_window", s, seq_len=n, query_range=qr, key_range=kr, causal=is_causal, q_last=16, sinks=sinks, pinv=None
    )
    mask = causal_mask_additive(n) if is_causal else None
    ref, _ = peer_attention(Module(), q, k, v, mask, 16**-0.5, 0.0, spec)
    out = kernels.sink_window_view_attention(q, k, v, s, sinks, query_range=qr, key_range=kr, causal=is_causal)
    assert (out.transpose(1, 2) - ref).abs().max() < TOL
    bm = kernels.sink_window_view_block_mask(n, s, sinks, qr, kr, is_causal)
    keep = torch.ones(n, n, dtype=torch.bool) if not is_causal else causal(n)
    keep[qr[0] : qr[1], kr[0] : kr[1]] &= sink_window_keys(np.arange(*qr), np.arange(*kr), s, sinks)
    assert int(kernels.blockmask_blocks(bm).sum()) == int(brute_blocks(keep).sum())


# --- vertical-slash -----------------------------------------------------------------------------


def vs_reference(q, k, s, q_last):
    n = q.shape[-2]
    X = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    pos = np.arange(n)
    vis = pos[None, :] <= pos[:, None]
    return vertical_slash_keys(X, pos, pos, s, q_last, vis) & torch.from_numpy(vis)


@pytest.mark.parametrize(
    "n,s,q_last,structured,candidates",
    [
        (200, 16, 8, False, None),
        (257, 64, 16, False, None),
        (300, 33, 16, True, None),
        (513, 48, 32, True, None),
        (130, 1, 4, False, None),
        (300, 32, 16, True, 20),  # few candidate diagonals: rows fall back to the reference's full-row rule
        (400, 150, 16, True, None),  # dense rows span two query blocks
    ],
)
def test_vertical_slash_keeps_the_reference_keys(n, s, q_last, structured, candidates):
    q, k, v = qkv(n, H=2, structured=structured)
    keep = vs_reference(q, k, s, q_last)[0]
    index = kernels.vertical_slash_index(q[0], k[0], s, q_last, candidates=candidates)
    assert torch.equal(kernels.vs_index_mask(index, n), keep)
    if structured:
        assert int(index.band.min()) >= 2, "a local head's diagonals run as a band"
    if candidates is not None:
        assert index.fallback_rows > 0
    # three disjoint parts: every kept key counted once
    i = torch.arange(n)
    is_v = torch.zeros(2, n, dtype=torch.bool).scatter_(1, index.verticals, True)
    vert = is_v[:, None, :] & causal(n)[None]
    off = i[:, None] - i[None, :]
    band = (off >= 0) & (off < index.band[:, None, None]) & ~is_v[:, None, :]
    extra = torch.zeros(2, n, n + 1, dtype=torch.bool).scatter_(
        2, torch.where(index.extras >= 0, index.extras, n), True
    )
    extra = extra[..., :n]
    d0 = index.dense_rows
    assert d0 == min(s, n) and torch.equal(keep[:, :d0], causal(n)[None, :d0].expand(2, -1, -1))
    assert not extra[:, :d0].any()
    vert, band = vert[:, d0:], band[:, d0:]
    assert int(vert.sum() + band.sum() + extra.sum()) == int(keep[:, d0:].sum())
    assert torch.equal(vert | band | extra[:, d0:], keep[:, d0:])
    out = kernels.vertical_slash_attention(q, k, v, s, q_last, index=index)
    assert (out - dense(q, k, v, keep[None])).abs().max() < TOL
    assert torch.equal(kernels.vs_blocks(index, n), brute_blocks(keep))


def test_vertical_slash_computes_its_own_index_per_sequence_and_head():
    q, k, v = (torch.cat(x) for x in zip(qkv(260, H=2, structured=True), qkv(260, H=2, seed=1)))  # batch 2
    keep = vs_reference(q, k, 24, 16)
    assert (kernels.vertical_slash_attention(q, k, v, 24, 16) - dense(q, k, v, keep)).abs().max() < TOL


@pytest.mark.parametrize("view", ["prefix", "all"])
@pytest.mark.parametrize("n,s,structured", [(200, 16, False), (260, 1, False), (300, 33, True), (385, 48, True)])
def test_vertical_slash_view_equals_peer_attention(view, n, s, structured):
    q, k, v = qkv(n, structured=structured)
    qr, kr, is_causal = views(n)[view]
    spec = PeerSpec(
        "vertical_slash", s, seq_len=n, query_range=qr, key_range=kr, causal=is_causal, q_last=16, sinks=4, pinv=None
    )
    ref, _ = peer_attention(Module(), q, k, v, causal_mask_additive(n) if is_causal else None, 0.25, 0.0, spec)
    out = kernels.vertical_slash_view_attention(q, k, v, s, 16, query_range=qr, key_range=kr, causal=is_causal)
    assert (out.transpose(1, 2) - ref).abs().max() < TOL


# --- view scope: Nyström and the paper's estimators ---------------------------------------------


def views(n):
    return {"prefix": ((n // 2, n), (0, n // 2), True), "all": ((0, n), (0, n), False)}


@pytest.mark.parametrize("view", ["prefix", "all"])
@pytest.mark.parametrize("pinv", ["exact", "iterative"])
def test_nystrom_equals_peer_attention(view, pinv):
    n, m = 200, 12
    q, k, v = qkv(n)
    qr, kr, is_causal = views(n)[view]
    spec = PeerSpec(
        "nystrom", m, seq_len=n, query_range=qr, key_range=kr, causal=is_causal, q_last=16, sinks=4, pinv=pinv
    )
    ref, _ = peer_attention(Module(), q, k, v, causal_mask_additive(n) if is_causal else None, 0.25, 0.0, spec)
    out = kernels.nystrom_attention(q, k, v, m, pinv=pinv, query_range=qr, key_range=kr, causal=is_causal)
    # The exact Moore-Penrose inverse of the landmark kernel is ill-conditioned: it amplifies the
    # rounding of a different association (the kernel never forms P̂) to ~3e-5 in float32, while the
    # float32 reference itself is ~3e-3 off its float64 value. The float64 check below is exact.
    tol = TOL if pinv == "iterative" else 1e-4
    assert (out.transpose(1, 2) - ref).abs().max() < tol


def test_nystrom_in_float64_is_the_reference_product():
    n, m = 200, 12
    q, k, v = (x.double() for x in qkv(n))
    P, _ = nystrom_from_qk(q, k, m, 0.25, "exact")
    out = kernels.nystrom_attention(q, k, v, m, pinv="exact", query_range=(0, n), key_range=(0, n), causal=False)
    assert (out - P @ v).abs().max() < 1e-10


@pytest.mark.parametrize("view", ["prefix", "all"])
@pytest.mark.parametrize("subset_only", [False, True])
def test_partial_equals_partial_scores(view, subset_only):
    n, s, H = 180, 10, 3
    q, k, v = qkv(n, H=H)
    qr, kr, is_causal = views(n)[view]
    d = kr[1] - kr[0]
    rng = np.random.default_rng(0)
    T = np.stack([np.sort(rng.choice(d, s, replace=False)) for _ in range(H)])
    if subset_only:
        W = np.zeros((H, d, s))
        W[np.arange(H)[:, None], T, np.arange(s)[None, :]] = 1.0
        b = np.full((H, d), -np.inf)
        np.put_along_axis(b, T, 0.0, axis=1)
    else:
        W, b = 0.2 * rng.standard_normal((H, d, s)), rng.standard_normal((H, d))
    pm = PartialMap(T, W, b, seq_len=n, query_range=qr, key_range=kr, causal=is_causal)
    S = partial_scores(q, k, pm, 0.25)
    if is_causal:
        S = S + causal_mask_additive(n)
    ref = torch.softmax(S, dim=-1) @ v
    Tt, Wt, bt = pm.T, pm.W.detach(), pm.bias().detach()
    assert kernels.is_subset_only(Tt, Wt, bt) == subset_only
    out = kernels.partial_attention(q, k, v, Tt, Wt, bt, query_range=qr, key_range=kr, causal=is_causal)
    assert (out - ref).abs().max() < TOL
    keep = causal(n) if is_causal else torch.ones(n, n, dtype=torch.bool)
    if subset_only:
        blocks = kernels.view_blocks(n, qr, kr, is_causal, Tt)
        for h in range(H):
            kh = keep.clone()
            kh[qr[0] :, kr[0] : kr[1]] = False
            kh[qr[0] :, torch.as_tensor(T[h])] = True
            assert int(blocks[h]) == int(brute_blocks(kh).sum())
    else:
        assert int(kernels.view_blocks(n, qr, kr, is_causal)[0]) == int(brute_blocks(keep).sum())


def test_views_the_kernels_cannot_run_are_refused():
    q, k, v = qkv(64)
    with pytest.raises(ValueError, match="precede"):
        kernels.nystrom_attention(q, k, v, 4, pinv="exact", query_range=(0, 64), key_range=(0, 64), causal=True)
    with pytest.raises(ValueError, match="start at 0"):
        kernels.nystrom_attention(q, k, v, 4, pinv="exact", query_range=(0, 32), key_range=(32, 64), causal=False)


# --- the clock ----------------------------------------------------------------------------------


def test_causal_blocks_and_macs_count_what_the_masks_keep():
    for n in (128, 200, 384):
        assert kernels.causal_blocks(n) == int(brute_blocks(causal(n)).sum())
        for s in (1, 16, 100):
            assert clock.capped_keys(n, s) == int(kernels.sink_window_whole_keys(n, s, 0).sum())
    assert clock.causal_macs(200, 64) == 2 * 64 * int(causal(200).sum())
    n, dh, s, q_last = 256, 64, 32, 16
    assert clock.macs_share("flex_causal", n=n, d_head=dh, s=s, q_last=q_last) == 1
    vs = clock.method_macs("vertical_slash", n=n, d_head=dh, s=s, q_last=q_last)
    assert vs == q_last * n * dh + 2 * dh * int(kernels.sink_window_whole_keys(n, s, 4).sum())
    # a view method is exact outside the view: at the view's full key count nystrom costs more than exact
    assert clock.macs_share("subset_only", n=n, d_head=dh, s=8, q_last=q_last) < 1


def test_latency_table_has_three_axes():
    table = clock.latency_table(
        [256],
        [16],
        d_head=16,
        heads=2,
        threads=1,
        device="cpu",
        repeats=1,
        compiled=False,
        sinks=4,
        q_last=8,
        pinv="exact",
        seed=0,
    )
    assert tuple(table.columns[: len(clock.COLUMNS)]) == clock.COLUMNS
    assert set(table["method"]) == set(clock.METHODS)
    assert (table["time_s"] > 0).all() and (table["sdpa_s"] > 0).all()
    flex = table.set_index("method").loc["flex_causal"]
    assert flex["macs_share"] == 1 and flex["blocks_share"] == 1
    assert ((table["blocks_share"] > 0) & (table["blocks_share"] <= 1)).all()
    assert set(clock.disagreements(table).index) <= set(table.index)


# --- a real layer of each default model (slow: fetched models) ----------------------------------


def capture_layer(model_dir, layer: int, n: int):
    """Q, K (after RoPE), V and the scale of one layer's attention (the layer-th attention call) on
    n tokens of text, from the model run through a recording attention backend."""
    from eigenattn.capture.attention import expand_heads
    from eigenattn.capture.interface import register_backend
    from eigenattn.capture.probe import load_capture_model

    got, calls = {}, []

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append(1)  # the layer by call order (minilm's attention modules carry no layer_idx)
        if len(calls) - 1 == layer:
            key2, value2, sc = expand_heads(query, key, value, scaling)
            got.update(q=query.detach().float(), k=key2.detach().float(), v=value2.detach().float(), scale=sc)
        out = F.scaled_dot_product_attention(
            query,
            *expand_heads(query, key, value, scaling)[:2],
            scale=scaling,
            attn_mask=None if attention_mask is None else attention_mask[..., : key.shape[-2]],
        )
        return out.transpose(1, 2).contiguous(), None

    name = register_backend(f"kernels_record_{next(BACKENDS)}", record)  # a name keeps its first function
    tok, model = load_capture_model(model_dir, str(model_dir), attn_implementation=name)
    text = " ".join(["The quick brown fox jumps over the lazy dog while the river runs to the sea."] * 40)
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    with torch.no_grad():
        model(input_ids=ids)
    return got


def test_real_layers(smollm2_dir, minilm_dir):
    n = 200
    g = capture_layer(smollm2_dir, 1, n)  # causal decoder: both scopes
    q, k, v, sc = g["q"], g["k"], g["v"], g["scale"]
    out = kernels.sink_window_attention(q, k, v, 24, 4, scale=sc)
    assert (out - dense(q, k, v, kernels.sink_window_whole_keys(n, 24, 4), sc)).abs().max() < TOL
    X = torch.matmul(q, k.transpose(-1, -2)) * sc
    pos = np.arange(n)
    vis = pos[None, :] <= pos[:, None]
    keep = vertical_slash_keys(X, pos, pos, 24, 16, vis) & torch.from_numpy(vis)
    out = kernels.vertical_slash_attention(q, k, v, 24, 16, scale=sc)
    assert (out - torch.softmax(masked_logits(X, keep), -1) @ v).abs().max() < TOL
    qr, kr = (n // 2, n), (0, n // 2)
    spec = PeerSpec(
        "nystrom", 8, seq_len=n, query_range=qr, key_range=kr, causal=True, q_last=16, sinks=4, pinv="exact"
    )
    ref, _ = peer_attention(Module(), q, k, v, causal_mask_additive(n), sc, 0.0, spec)
    out = kernels.nystrom_attention(q, k, v, 8, pinv="exact", query_range=qr, key_range=kr, causal=True, scale=sc)
    assert (out.transpose(1, 2) - ref).abs().max() < TOL
    g = capture_layer(minilm_dir, 1, 128)  # bidirectional encoder: the all view
    q, k, v, sc = g["q"], g["k"], g["v"], g["scale"]
    n, H = q.shape[2], q.shape[1]
    rng = np.random.default_rng(0)
    T = np.stack([np.sort(rng.choice(n, 8, replace=False)) for _ in range(H)])
    pm = PartialMap(
        T,
        0.2 * rng.standard_normal((H, n, 8)),
        rng.standard_normal((H, n)),
        seq_len=n,
        query_range=(0, n),
        key_range=(0, n),
    )
    ref = torch.softmax(partial_scores(q, k, pm, sc), dim=-1) @ v
    out = kernels.partial_attention(
        q, k, v, pm.T, pm.W.detach(), pm.bias().detach(), query_range=(0, n), key_range=(0, n), causal=False, scale=sc
    )
    assert (out - ref).abs().max() < TOL
