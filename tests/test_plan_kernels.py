"""Plans that run (docs/method.md §15): a model under ``apply_plan`` with the real kernels gives the
output of the same plan by its dense-mask reference, within 1e-4, on a causal model with grouped
queries (the prefix view) and on a bidirectional encoder (the ``all`` view); a padded batch falls
back to the reference; layers without a plan run SDPA; the real kernels really differ from exact."""

import numpy as np
import pandas as pd
import pytest
import torch

from eigenattn.errors import InputError
from eigenattn.reconstruction.partial import detach, register
from eigenattn.reconstruction.peer_attention import PeerSpec
from eigenattn.reconstruction.plan_attention import PLAN_KERNELS_IMPL, apply_plan
from eigenattn.reconstruction.plan_attention import layer_plans as _layer_plans
from eigenattn.reconstruction.plans import EXACT, HeadChoice, Plan, read_plan, write_plan

# eager FlexAttention (kernels="eager") materialises its scores and says so; that is the point here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SETTINGS = {"ridge": 1e-6, "rank": 0.5, "seed": 0, "q_last": 4, "sinks": 2}
# every method a plan can choose, with the real kernel it runs on
METHODS = [
    ("sink_window", "-", 6),
    ("vertical_slash", "-", 6),
    ("nystrom", "iterative", 4),
    ("eigenspace", "pivoted_qr", 6),
    ("subset_only", "pivoted_qr", 6),
    ("mean", "pivoted_qr", 4),
    (EXACT, "-", 0),
]


class _Stats:
    """Fit statistics (μ, U, Λ) of every layer, for the paper estimators' maps."""

    model = "m"

    def __init__(self, n, query_range, key_range, causal, H, seed=0):
        self.view = "prefix" if causal else "all"
        self.seq_len, self.query_range, self.key_range, self.causal = n, query_range, key_range, causal
        d = key_range[1] - key_range[0]
        rng = np.random.default_rng(seed)
        self.mean = rng.normal(size=(H, d))
        A = rng.normal(size=(H, d, d))
        lam, U = np.linalg.eigh(A @ np.swapaxes(A, -1, -2) / d)
        self.lam, self.U = lam[:, ::-1].copy(), U[:, :, ::-1].copy()

    def head_stats(self, layer):
        return self.mean, self.U, self.lam


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(register())
    return model


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=56, num_hidden_layers=2, num_attention_heads=7, intermediate_size=80)
    model = BertModel(cfg).eval()
    model.set_attn_implementation(register())
    return model


def _plan(n, causal, H, layers, methods=METHODS):
    qr, kr = ((n // 2, n), (0, n // 2)) if causal else ((0, n), (0, n))
    heads = [
        HeadChoice(layer, h, *methods[(h + layer) % len(methods)], 0.5, 0.0, 0.0) for layer in layers for h in range(H)
    ]
    plan = Plan("m", "prefix" if causal else "all", 0.5, "tv", n, qr, kr, causal, SETTINGS, heads)
    return plan, _Stats(n, qr, kr, causal, H)


def _out(model, ids, **kw):
    with torch.inference_mode():
        res = model(input_ids=ids, **kw)
    return (res.logits if hasattr(res, "logits") else res.last_hidden_state).float()


def _run(model, plan, stats, ids, kernels, **kw):
    try:
        apply_plan(model, plan, stats=stats, kernels=kernels)
        return _out(model, ids, **kw)
    finally:
        detach(model)


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many head groups ran through a real kernel (plan_attention.kernel_group)."""
    from eigenattn.reconstruction import plan_attention

    calls = []
    real = plan_attention.kernel_group

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_attention, "kernel_group", spy)
    return calls


@pytest.mark.parametrize("make, causal, n", [(_llama, True, 48), (_bert, False, 40)])
def test_real_kernels_equal_the_dense_reference_in_a_model(make, causal, n, kernel_calls):
    model = make()
    H = model.config.num_attention_heads
    plan, stats = _plan(n, causal, H, layers=[0, 1])
    ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(1))
    exact = _out(model, ids)
    dense = _run(model, plan, stats, ids, "dense")
    assert not kernel_calls
    real = _run(model, plan, stats, ids, "eager")
    assert model.config._attn_implementation == PLAN_KERNELS_IMPL
    groups = sum(len(lp.groups) for lp in _layer_plans(plan, stats).values())
    assert len(kernel_calls) == groups  # every group of every planned layer ran through a kernel
    torch.testing.assert_close(real, dense, rtol=1e-4, atol=1e-4)
    # the plan changes the model (a kernel that ran exact attention would fail here) ...
    assert (dense - exact).abs().max() > 1e-2
    # ... and with the plan detached, the kernel backend is the exact model (SDPA)
    torch.testing.assert_close(_out(model, ids), exact, rtol=1e-4, atol=1e-5)


def test_each_method_alone_equals_its_reference():
    """One method on every head of a layer, method by method: the whole-layer output by the real
    kernel equals the dense reference (so no method hides behind another in the mixed plan)."""
    model = _llama()
    n, H = 48, model.config.num_attention_heads
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(2))
    for m in METHODS[:-1]:
        plan, stats = _plan(n, True, H, layers=[1], methods=[m])
        dense = _run(model, plan, stats, ids, "dense")
        real = _run(model, plan, stats, ids, "eager")
        torch.testing.assert_close(real, dense, rtol=1e-4, atol=1e-4, msg=lambda s, m=m: f"{m}: {s}")


def test_a_padded_batch_runs_the_dense_reference(kernel_calls):
    """The unpadded sequence of a padded batch gets the reference's output. (The padded one's pad
    positions hold whatever each backend leaves there, and a paper estimator whose subset holds a
    pad key reads its score, so only its finiteness is checked. Nyström refuses a mask inside its
    view and sits this one out.)"""
    model = _llama()
    n, H = 48, model.config.num_attention_heads
    plan, stats = _plan(n, True, H, layers=[0, 2], methods=[m for m in METHODS if m[0] != "nystrom"])
    ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(3))
    pad = torch.ones(2, n, dtype=torch.long)
    pad[1, :5] = 0
    dense = _run(model, plan, stats, ids, "dense", attention_mask=pad)
    real = _run(model, plan, stats, ids, "eager", attention_mask=pad)
    torch.testing.assert_close(real[0], dense[0], rtol=1e-4, atol=1e-4)
    assert bool(torch.isfinite(real).all())
    assert not kernel_calls  # a padded batch never reaches a kernel that cannot see its mask


def test_another_length_and_an_unknown_mode_are_refused():
    model = _llama()
    n, H = 48, model.config.num_attention_heads
    plan, stats = _plan(n, True, H, layers=[0])
    with pytest.raises(InputError, match="kernels"):
        apply_plan(model, plan, stats=stats, kernels="fast")
    try:
        apply_plan(model, plan, stats=stats, kernels="eager")
        with pytest.raises(InputError, match="exactly 48 tokens"):
            _out(model, torch.zeros(1, 40, dtype=torch.long))
    finally:
        detach(model)


@pytest.mark.slow
def test_compiled_kernels_equal_the_dense_reference():
    """torch.compile'd FlexAttention (sink + window), the default of apply_plan."""
    model = _llama()
    n, H = 256, model.config.num_attention_heads
    plan, stats = _plan(n, True, H, layers=[0, 1, 2], methods=[("sink_window", "-", 32), (EXACT, "-", 0)])
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(4))
    dense = _run(model, plan, stats, ids, "dense")
    real = _run(model, plan, stats, ids, "compiled")
    torch.testing.assert_close(real, dense, rtol=1e-4, atol=1e-4)


def _real_plan(model, n, causal):
    H = model.config.num_attention_heads
    layers = range(min(2, model.config.num_hidden_layers))
    methods = [m for m in METHODS if m[0] in ("sink_window", "vertical_slash", "nystrom", EXACT)]
    return _plan(n, causal, H, layers=layers, methods=methods)


@pytest.mark.parametrize("name, causal", [("smollm2", True), ("minilm", False)])
def test_real_kernels_in_each_default_model(resources, name, causal):
    """The peers and exact heads of a plan on a real layer of each default model (the paper
    estimators' maps need a run's statistics; the random-model tests above cover them)."""
    from eigenattn.reconstruction.plan_attention import load_for_plans

    model = load_for_plans(resources / "models" / name, causal)
    n = 128
    plan, stats = _real_plan(model, n, causal)
    ids = torch.randint(5, 1000, (2, n), generator=torch.Generator().manual_seed(5))
    dense = _run(model, plan, stats, ids, "dense")
    real = _run(model, plan, stats, ids, "eager")
    torch.testing.assert_close(real, dense, rtol=1e-4, atol=1e-4)


def _whole_plan(n, H, layers, methods):
    heads = [
        HeadChoice(layer, h, *methods[(h + layer) % len(methods)], 0.5, 0.0, 0.0) for layer in layers for h in range(H)
    ]
    return Plan("m", "whole", 0.3, "tv", n, (0, n), (0, n), True, SETTINGS, heads, scope="whole", cost="time")


WHOLE = [("sink_window", "-", 8), ("vertical_slash", "-", 12), (EXACT, "-", 0), ("sink_window", "-", 20)]


@pytest.mark.parametrize("kernels", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_whole_scope_kernels_equal_the_dense_reference(kernels, tmp_path):
    """Whole scope (§15): every query of a causal head runs sink + window or vertical-slash (one
    FlexAttention call per sink + window group; vertical-slash's gathered columns, band and
    diagonals), against the same plan by the dense-mask reference; the plan file keeps its scope."""
    model = _llama()
    n, H = 160 if kernels == "eager" else 384, model.config.num_attention_heads
    plan = _whole_plan(n, H, [0, 1, 2], WHOLE)
    write_plan(plan, tmp_path / "p.json")
    again = read_plan(tmp_path / "p.json")
    assert (again.scope, again.cost) == ("whole", "time")
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(6))
    exact = _out(model, ids)
    dense = _run(model, again, None, ids, "dense")
    real = _run(model, again, None, ids, kernels)
    torch.testing.assert_close(real, dense, rtol=1e-4, atol=1e-4)
    assert (dense - exact).abs().max() > 1e-2  # the early queries differ too: not the prefix view


def test_a_whole_scope_plan_holds_only_methods_defined_there():
    """No Nyström, no paper estimator (they need a view), no encoder, no partial geometry."""
    n, H = 64, 4
    for m in [("nystrom", "iterative", 4), ("eigenspace", "pivoted_qr", 4), ("subset_only", "pivoted_qr", 4)]:
        with pytest.raises(InputError, match="not defined for causal whole attention"):
            _whole_plan(n, H, [0], [m, (EXACT, "-", 0)])
    heads = [HeadChoice(0, 0, "sink_window", "-", 8, 0.5, 0.0, 0.0)]
    with pytest.raises(InputError, match="causal models"):
        Plan("m", "whole", 0.3, "tv", n, (0, n), (0, n), False, SETTINGS, heads, scope="whole")
    with pytest.raises(InputError, match="covers queries and keys"):
        Plan("m", "whole", 0.3, "tv", n, (n // 2, n), (0, n // 2), True, SETTINGS, heads, scope="whole")


# ---------------------------------------------------------------------------------------------
# whole-scope plans priced by the clock (eigenattn.reconstruction.whole_plans)


def test_whole_damage_is_the_tv_of_the_renormalised_rows_by_brute_force():
    """1 − kept mass equals the TV between each exact row and the method's renormalised row, the
    rows taken from transformers' own output_attentions (eager), not from the recorded Q and K."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eigenattn.reconstruction import kernels as K
    from eigenattn.reconstruction.whole_plans import whole_damage

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=256, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    n, sinks, q_last = 40, 2, 4
    ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(7))
    grid = [("sink_window", 6), ("sink_window", 12), ("vertical_slash", 8)]
    got = whole_damage(model, ids, grid, sinks=sinks, q_last=q_last).set_index(
        ["layer", "head", "estimator", "subset_size"]
    )
    assert model.config._attn_implementation == "eager"  # restored
    with torch.inference_mode():
        att = [model(input_ids=ids[b : b + 1], output_attentions=True).attentions for b in range(2)]
    # vertical-slash's keys: the dense reference's rule (PeerSpec.keep) on log P, the scores up to
    # a per-row constant (its pattern is a softmax of the last q_last rows, blind to that constant)
    peer = PeerSpec("vertical_slash", 8, seq_len=n, query_range=(0, n), key_range=(0, n), causal=True,
                    q_last=q_last, sinks=sinks, pinv=None)  # fmt: skip
    for layer in range(2):
        for h in range(4):
            for m, s in grid:
                tvs = []
                for b in range(2):
                    P = att[b][layer][0, h].double()
                    if m == "sink_window":
                        keep = K.sink_window_whole_keys(n, s, sinks)
                    else:
                        keep = peer.keep(P.float().log()[None, None])[0, 0] & torch.ones(n, n, dtype=torch.bool).tril()
                    Q = torch.where(keep, P, 0.0)
                    Q = Q / Q.sum(-1, keepdim=True)
                    tvs.append(float(0.5 * (P - Q).abs().sum(-1).mean()))
                assert got.loc[(layer, h, m, s), "tv"] == pytest.approx(np.mean(tvs), abs=1e-5), (layer, h, m, s)
    assert (got["tv"] > 0).all() and (got["tv"] < 1).all()


def test_a_time_priced_plan_never_exceeds_its_budget_by_the_latency_table():
    from eigenattn.reconstruction.whole_plans import best_single, candidates, whole_plan

    rng = np.random.default_rng(0)
    grid = [("sink_window", s) for s in (16, 64, 256)] + [("vertical_slash", s) for s in (64, 256)]
    damage = pd.DataFrame(
        [
            {"layer": layer, "head": h, "estimator": m, "subset_size": s, "tv": float(rng.uniform(0, 1) / np.log2(s))}
            for layer in range(3)
            for h in range(6)
            for m, s in grid
        ]
    )
    # vertical-slash far dearer in time than in multiply-adds, as measured (method.md §15)
    times = {("sink_window", 16): 0.05, ("sink_window", 64): 0.1, ("sink_window", 256): 0.3}
    times |= {("vertical_slash", 64): 0.9, ("vertical_slash", 256): 1.4}
    latency = pd.DataFrame([{"method": m, "s": s, "n": 1024, "time_share": t} for (m, s), t in times.items()])
    cands = candidates(damage, latency, 1024)
    for budget in (0.06, 0.15, 0.3, 0.5):
        plan = whole_plan(cands, budget, model="m", n=1024, settings=SETTINGS, device="cpu")
        assert (plan.scope, plan.cost, plan.device) == ("whole", "time", "cpu")
        by_table = np.mean([times.get((h.method, h.s), 1.0) for h in plan.heads])
        assert by_table <= budget + 1e-9 and plan.cost_share == pytest.approx(by_table)
        m, s, t, _ = best_single(cands, plan.cost_share)
        assert t <= plan.cost_share + 1e-12 and m == "sink_window"  # vertical-slash never fits by time
    with pytest.raises(ValueError, match="no time for"):
        candidates(damage, latency[latency.method != "vertical_slash"], 1024)
