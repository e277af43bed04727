"""`partial` attention inside the real pretrained models (minilm: bidirectional; smollm2: GQA,
RoPE, causal), against transformers' own eager attention."""

import numpy as np
import pytest
import torch
from transformers import AutoModel

from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.partial import PartialMap, attach, attention_modules, detach, register

n = 24


@pytest.fixture(scope="module", params=["minilm", "smollm2"])
def models(request, resources):
    path = resources / "models" / request.param
    eager = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    partial = AutoModel.from_pretrained(path, attn_implementation=register(), dtype=torch.float32).eval()
    causal = request.param == "smollm2"
    return request.param, eager, partial, causal


def view(causal):
    return ((n // 2, n), (0, n // 2)) if causal else ((0, n), (0, n))


def maps(model, causal, s=None, seed=0, random_map=False):
    cfg = model.config
    H = cfg.num_attention_heads
    (q0, q1), (k0, k1) = view(causal)
    d = k1 - k0
    s = d if s is None else s
    rng = np.random.default_rng(seed)
    out = {}
    for layer in attention_modules(model):
        T = np.stack([np.sort(rng.choice(d, s, replace=False)) if s < d else np.arange(d) for _ in range(H)])
        if random_map:
            W, b = 0.3 * rng.standard_normal((H, d, s)), rng.standard_normal((H, d))
        else:  # identity on the full key set
            W, b = np.broadcast_to(np.eye(d), (H, d, d)), np.zeros((H, d))
        out[layer] = PartialMap(T, W, b, seq_len=n, query_range=(q0, q1), key_range=(k0, k1), causal=causal)
    return out


def ids(seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(100, 1000, size=(2, n)))


@torch.inference_mode()
def test_all_keys_equals_eager(models):
    name, eager, partial, causal = models
    x = ids()
    want = eager(input_ids=x).last_hidden_state
    attach(partial, maps(partial, causal))
    try:
        got = partial(input_ids=x).last_hidden_state
    finally:
        detach(partial)
    assert (got - want).abs().max().item() <= 1e-5
    # and without maps it is exact eager attention
    assert (partial(input_ids=x).last_hidden_state - want).abs().max().item() <= 1e-5


@torch.inference_mode()
def test_reconstruction_changes_outputs_and_respects_the_causal_mask(models):
    name, eager, partial, causal = models
    x = ids(1)
    want = eager(input_ids=x).last_hidden_state
    attach(partial, maps(partial, causal, s=4, random_map=True))
    try:
        got = partial(input_ids=x).last_hidden_state
        assert (got - want).abs().max().item() > 1e-2  # the approximation is really in the forward pass
        if causal:
            i = n - 4
            y = x.clone()
            y[:, i + 1 :] = torch.flip(y[:, i + 1 :], dims=[1]) + 7
            got2 = partial(input_ids=y).last_hidden_state
            assert (got2[:, : i + 1] - got[:, : i + 1]).abs().max().item() <= 1e-5
            assert (got2[:, i + 1 :] - got[:, i + 1 :]).abs().max().item() > 1e-3
            # the first half of the queries is outside the prefix view: exact
            assert (got[:, : n // 2] - want[:, : n // 2]).abs().max().item() <= 1e-5
    finally:
        detach(partial)


def test_bad_maps(models):
    name, eager, partial, causal = models
    H = partial.config.num_attention_heads
    if causal:
        with pytest.raises(
            ConfigError,
            match=r"'eigen.views': keys 0\.\.\d+ reach past the first query 0.*"
            r"\n  fix: use the prefix view for causal models",
        ):
            PartialMap(
                np.zeros((H, 2), int),
                np.zeros((H, n, 2)),
                np.zeros((H, n)),
                seq_len=n,
                query_range=(0, n),
                key_range=(0, n),
                causal=True,
            )
    attach(partial, maps(partial, causal))
    try:
        with (
            pytest.raises(InputError, match=f"input 'partial attention input': the map was fitted for seq_len {n}"),
            torch.inference_mode(),
        ):
            partial(input_ids=ids()[:, : n - 2])
    finally:
        detach(partial)
    with pytest.raises(InputError, match="not attention layers"):
        attach(partial, {99: next(iter(maps(partial, causal).values()))})
