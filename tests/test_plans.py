"""Per-head plans (docs/method.md §13): the solver against brute force, the budget, the choice's
isolation from held-out data, a plan's heads against their methods run alone, budget 1 = the exact
model, and a C5 row that says "not supported" when one method is best for every head."""

import numpy as np
import pandas as pd
import pytest
import torch

from eigenattn.claims.plans import c5_rows
from eigenattn.errors import ConfigError, InputError
from eigenattn.reconstruction.estimators import fit_heads
from eigenattn.reconstruction.partial import (
    ATTR,
    PEER_ATTR,
    PartialMap,
    detach,
    partial_attention_forward,
    register,
)
from eigenattn.reconstruction.peer_attention import PeerSpec
from eigenattn.reconstruction.plan_attention import apply_plan, layer_plans
from eigenattn.reconstruction.plan_eval import paired_interval, per_sequence, probe_heads
from eigenattn.reconstruction.plans import (
    EXACT,
    HeadChoice,
    Plan,
    brute_force,
    candidates,
    make_plan,
    read_plan,
    solve,
    uniform_plan,
    write_plan,
)

SETTINGS = {"ridge": 1e-6, "rank": 0.5, "seed": 0, "q_last": 4, "sinks": 2}


@pytest.mark.parametrize("seed", range(12))
def test_solver_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    G = int(rng.integers(2, 6))
    groups = [rng.random(int(rng.integers(1, 5))) for _ in range(G)]
    costs = [rng.random(len(g)) for g in groups]
    capacity = float(sum(c.min() for c in costs) + rng.random() * sum(c.max() - c.min() for c in costs))
    best, pick = brute_force(groups, costs, capacity)
    choice, info = solve(groups, costs, capacity)
    assert info["optimal"]
    got = sum(groups[g][i] for g, i in enumerate(choice))
    assert got == pytest.approx(best, abs=1e-9), (choice, pick)
    assert sum(costs[g][i] for g, i in enumerate(choice)) <= capacity + 1e-9


def test_solver_refuses_an_impossible_budget():
    with pytest.raises(ConfigError, match="plans.budgets"):
        solve([np.array([1.0, 0.0])], [np.array([0.5, 1.0])], 0.4)


def _recon(rng, layers=2, heads=3, with_heldout=True):
    """A reconstruction table's fit (and held-out) rows for a few candidates per head."""
    rows = []
    methods = [("vertical_slash", "-", 4, 0.3), ("sink_window", "-", 4, 0.25), ("nystrom", "iterative", 2, 0.12)]
    methods += [("eigenspace", "pivoted_qr", 4, 0.6), ("topk_oracle", "-", 4, 0.25)]
    for split in ("fit", "heldout") if with_heldout else ("fit",):
        for layer in range(layers):
            for head in range(heads):
                for e, st, s, c in methods:
                    for _ in range(3):  # rows of several sequences: the damage is their mean TV
                        rows.append(
                            {
                                "split": split,
                                "basis_source": "same",
                                "layer": layer,
                                "head": head,
                                "estimator": e,
                                "strategy": st,
                                "subset_size": s,
                                "cost_share": c,
                                "tv": float(rng.random()),
                            }
                        )
    return pd.DataFrame(rows)


METHODS = [("vertical_slash", "-"), ("sink_window", "-"), ("nystrom", "iterative"), ("eigenspace", "pivoted_qr")]
META = {"model": "m", "view": "prefix", "seq_len": 16, "query_range": (8, 16), "key_range": (0, 8), "causal": True}


def test_plan_cost_within_budget_and_oracles_never_candidates():
    rng = np.random.default_rng(0)
    cands = candidates(_recon(rng), METHODS + [("topk_oracle", "-")])
    assert "topk_oracle" not in set(cands.estimator)
    assert (cands[cands.estimator == EXACT].cost_share == 1).all()
    for budget in (0.12, 0.2, 0.3, 0.45, 0.7, 1.0):
        plan = make_plan(cands, budget, "tv", {**META, "settings": SETTINGS})
        assert plan.cost_share <= budget + 1e-12
        assert len(plan.heads) == 6 and plan.solver["optimal"]
    full = make_plan(cands, 1.0, "tv", {**META, "settings": SETTINGS})
    assert {h.method for h in full.heads} == {EXACT}  # budget 1: exact (damage 0) for every head


def test_choice_never_reads_heldout_rows():
    rng = np.random.default_rng(1)
    recon = _recon(rng)
    fit_only = recon[recon.split == "fit"]
    poisoned = recon.copy()
    held = poisoned.split == "heldout"
    poisoned.loc[held, "tv"] = -1e9  # a plan that read these would pick them everywhere
    poisoned.loc[held, "cost_share"] = 0.0
    for budget in (0.2, 0.4):
        plans = [
            make_plan(candidates(t, METHODS), budget, "tv", {**META, "settings": SETTINGS})
            for t in (fit_only, poisoned)
        ]
        assert plans[0].heads == plans[1].heads


def test_sensitivity_damage_weights_tv():
    rng = np.random.default_rng(2)
    recon = _recon(rng, layers=1, heads=2, with_heldout=False)
    sens = pd.Series({(0, 0): 10.0, (0, 1): 0.1})
    c = candidates(recon, METHODS, sens)
    np.testing.assert_allclose(c.damage_sensitivity, c.tv * [10.0 if h == 0 else 0.1 for h in c["head"]])
    with pytest.raises(InputError, match="sensitivity"):
        candidates(recon, METHODS, pd.Series({(0, 0): 1.0}))


def test_plan_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    plan = make_plan(candidates(_recon(rng), METHODS), 0.3, "tv", {**META, "settings": SETTINGS})
    write_plan(plan, tmp_path / "p.json")
    back = read_plan(tmp_path / "p.json")
    assert back.heads == plan.heads and back.cost_share == pytest.approx(plan.cost_share)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError):
        read_plan(tmp_path / "bad.json")


class _Stats:
    """Fit statistics (μ, U, Λ) of a layer for the paper estimators' maps."""

    seq_len, query_range, key_range, causal = 16, (8, 16), (0, 8), True

    def __init__(self, H, d, seed=0):
        rng = np.random.default_rng(seed)
        self.mean = rng.normal(size=(H, d))
        A = rng.normal(size=(H, d, d))
        C = A @ np.swapaxes(A, -1, -2) / d
        lam, U = np.linalg.eigh(C)
        self.lam, self.U = lam[:, ::-1].copy(), U[:, :, ::-1].copy()

    def head_stats(self, layer):
        return self.mean, self.U, self.lam


def test_each_planned_head_runs_its_method_alone():
    """A layer whose heads run four different methods: every head's output equals that head's
    output when its method runs the whole layer (peers through PeerSpec, the paper estimator
    through a PartialMap fitted for every head)."""
    torch.manual_seed(0)
    B, H, n, dh = 2, 5, 16, 8
    qr, kr = (8, 16), (0, 8)
    q, k, v = (torch.randn(B, H, n, dh) for _ in range(3))
    mask = torch.triu(torch.full((n, n), float("-inf")), 1)[None, None]
    stats = _Stats(H, 8)
    chosen = {0: ("vertical_slash", "-", 4), 1: ("nystrom", "iterative", 2), 2: ("eigenspace", "pivoted_qr", 3)}
    chosen |= {3: (EXACT, "-", 0), 4: ("sink_window", "-", 4)}
    plan = Plan(
        "m",
        "prefix",
        0.5,
        "tv",
        n,
        qr,
        kr,
        True,
        SETTINGS,
        [HeadChoice(0, h, m, st, s, 0.5, 0.0, 0.0) for h, (m, st, s) in chosen.items()],
    )
    module = torch.nn.Module()
    (lp,) = layer_plans(plan, stats).values()
    module.eigenattn_plan = lp
    out_plan, _ = partial_attention_forward(module, q, k, v, mask, scaling=0.3)
    del module.eigenattn_plan
    geo = {"seq_len": n, "query_range": qr, "key_range": kr, "causal": True, "q_last": 4, "sinks": 2}
    for h, (m, st, s) in chosen.items():
        if m == EXACT:
            pass
        elif m == "eigenspace":
            mean, U, lam = stats.head_stats(0)
            fm = fit_heads(m, st, s, mean, U, lam, ridge=1e-6, rank=0.5, seed=0, key=(0,))
            setattr(module, ATTR, PartialMap(fm.T, fm.W, fm.b, seq_len=n, query_range=qr, key_range=kr, causal=True))
        else:
            setattr(module, PEER_ATTR, PeerSpec(m, s, **geo, pinv=st if m == "nystrom" else None))
        alone, _ = partial_attention_forward(module, q, k, v, mask, scaling=0.3)
        for attr in (ATTR, PEER_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
        torch.testing.assert_close(out_plan[:, :, h], alone[:, :, h], rtol=1e-5, atol=1e-6)
    # and the methods really differ: the test can fail
    assert not torch.allclose(out_plan[:, :, 0], out_plan[:, :, 3], atol=1e-3)


def test_apply_plan_needs_stats_for_paper_estimators():
    plan = Plan(
        "m",
        "prefix",
        1.0,
        "tv",
        16,
        (8, 16),
        (0, 8),
        True,
        SETTINGS,
        [HeadChoice(0, 0, "mean", "pivoted_qr", 2, 0.5, 0, 0)],
    )
    with pytest.raises(InputError, match="rows_store"):
        layer_plans(plan, None)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from eigenattn.reconstruction.plugin import load

    return load(smollm2_dir, True, torch.device("cpu"))


def _smollm2_plan(model, n, method_of):
    L, H = 2, model.config.num_attention_heads
    heads = [HeadChoice(layer, h, *method_of(layer, h), 1.0, 0.0, 0.0) for layer in range(L) for h in range(H)]
    return Plan("smollm2", "prefix", 1.0, "tv", n, (n // 2, n), (0, n // 2), True, SETTINGS, heads)


def test_budget_one_plan_reproduces_the_exact_model(smollm2):
    n = 32
    ids = torch.randint(0, 1000, (2, n))
    exact = per_sequence(smollm2, ids, True, n // 2, 2)
    plan = _smollm2_plan(smollm2, n, lambda layer, h: (EXACT, "-", 0))
    try:
        apply_plan(smollm2, plan)
        planned = per_sequence(smollm2, ids, True, n // 2, 2)
    finally:
        detach(smollm2)
    np.testing.assert_allclose(planned, exact, rtol=1e-5)
    mixed = _smollm2_plan(smollm2, n, lambda layer, h: ("sink_window", "-", 4) if h % 2 else (EXACT, "-", 0))
    try:
        apply_plan(smollm2, mixed)
        approx = per_sequence(smollm2, ids, True, n // 2, 2)
    finally:
        detach(smollm2)
    assert not np.allclose(approx, exact, rtol=1e-4)  # a plan that changes heads changes the model


def test_one_method_best_everywhere_gives_that_method_and_a_failing_row(smollm2, tmp_path):
    """Synthetic: sink_window is the least damaging candidate that the budget (0.15) can pay for on
    every head (vertical_slash damages more and costs more; exact on even one head would cost 0.875
    more, past the 18 heads' slack of 0.45). The plan is then that single method on every head,
    the whole-model outputs are identical, and the C5 row
    says the plan does not beat the single method."""
    n = 32
    rows = []
    for layer in range(2):
        for h in range(smollm2.config.num_attention_heads):
            for e, st, s, c, tv in (("sink_window", "-", 4, 0.125, 0.1), ("vertical_slash", "-", 4, 0.2, 0.3)):
                rows.append(
                    {"split": "fit", "basis_source": "same", "layer": layer, "head": h, "estimator": e}
                    | {"strategy": st, "subset_size": s, "cost_share": c, "tv": tv}
                )
    meta = {
        **META,
        "model": "smollm2",
        "seq_len": n,
        "query_range": (16, 32),
        "key_range": (0, 16),
        "settings": SETTINGS,
    }
    plan = make_plan(candidates(pd.DataFrame(rows), METHODS), 0.15, "tv", meta)
    assert {(h.method, h.s) for h in plan.heads} == {("sink_window", 4)}
    single = uniform_plan(plan, "sink_window", "-", 4, 0.125)
    ids = torch.randint(0, 1000, (4, n))
    out = {}
    for name, p in (("plan", plan), ("single", single)):
        try:
            apply_plan(smollm2, p)
            out[name] = per_sequence(smollm2, ids, True, 16, 4)
        finally:
            detach(smollm2)
    np.testing.assert_array_equal(out["plan"], out["single"])
    diff, low, high = paired_interval(out["single"], out["plan"])
    summary = pd.DataFrame(
        [
            {
                "model": "smollm2",
                "view": "prefix",
                "damage": "tv",
                "budget": 0.15,
                "cost_share": plan.cost_share,
                "metric": "perplexity",
                "plan_value": float(np.exp(out["plan"].mean())),
                "exact_value": 20.0,
                "single_method": "sink_window",
                "single_strategy": "-",
                "single_s": 4,
                "single_cost_share": 0.125,
                "single_value": float(np.exp(out["single"].mean())),
                "gap_recovered": 0.0,
                "paired_diff": diff,
                "paired_low": low,
                "paired_high": high,
                "n_sequences": 4,
            }
        ]
    )
    summary.to_csv(tmp_path / "summary.csv", index=False)
    (row,) = c5_rows([tmp_path / "summary.csv"])
    assert row["state"] == "not supported" and row["claim"] == "C5"
    # and a clearly better plan is supported
    summary.assign(paired_diff=0.2, paired_low=0.1, paired_high=0.3).to_csv(tmp_path / "better.csv", index=False)
    assert c5_rows([tmp_path / "better.csv"])[0]["state"] == "supported"


def test_probe_gates_and_statistics(smollm2):
    """The head probe: gates at 1 leave the model unchanged; the sensitivity is |∂loss/∂ξ_h| (checked
    against a finite difference of one gate), sink and diagonal mass are probabilities, and the
    entropy is at most log(n)."""
    n = 32
    ids = torch.randint(0, 1000, (2, n))
    p = probe_heads(smollm2, [0, 1], ids, True, 16, (16, 32), 2, 1, 0)
    assert len(p) == 2 * smollm2.config.num_attention_heads
    assert ((p.sink_mass >= 0) & (p.sink_mass <= 1 + 1e-9)).all() and (
        (p.diagonal_mass >= 0) & (p.diagonal_mass <= 1)
    ).all()
    assert (p.entropy <= np.log(n) + 1e-9).all() and (p.sensitivity >= 0).all() and (p.sensitivity > 0).any()
    # finite difference on the first sequence, head (1, 0)
    from eigenattn.reconstruction.partial import PROBE_ATTR, attention_modules
    from eigenattn.reconstruction.plan_attention import HeadProbe

    one = probe_heads(smollm2, [1], ids[:1], True, 16, (16, 32), 2, 1, 0)
    mod = attention_modules(smollm2)[1]

    def loss(eps):
        pr = HeadProbe(smollm2.config.num_attention_heads, (16, 32), 2)
        with torch.no_grad():
            pr.gate[0] += eps
        setattr(mod, PROBE_ATTR, pr)
        try:
            with torch.no_grad():
                logits = smollm2(input_ids=ids[:1]).logits[:, 16:-1].float()
                return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 17:]))
        finally:
            delattr(mod, PROBE_ATTR)

    fd = abs(loss(1e-3) - loss(-1e-3)) / 2e-3
    assert one.set_index(["layer", "head"]).sensitivity[(1, 0)] == pytest.approx(fd, rel=0.05, abs=1e-5)


def test_register_is_the_plugin_backend():
    assert register() == "partial"


def test_exact_wins_ties_with_a_method_that_computes_every_key():
    """At s = d, `mean` computes every score: same cost and (zero) damage as exact. The plan says exact."""
    rows = [
        {"split": "fit", "basis_source": "same", "layer": 0, "head": h, "estimator": "mean", "strategy": "pivoted_qr"}
        | {"subset_size": 8, "cost_share": 1.0, "tv": 0.0}
        for h in range(3)
    ]
    plan = make_plan(
        candidates(pd.DataFrame(rows), [("mean", "pivoted_qr")]), 1.0, "tv", {**META, "settings": SETTINGS}
    )
    assert {h.method for h in plan.heads} == {EXACT}


def test_a_budget_no_plan_can_meet_reads_inconclusive(tmp_path):
    note = "no plan within budget 0.01: the cheapest candidates cost 0.0625 of exact"
    pd.DataFrame([{"model": "m", "view": "all", "damage": "tv", "budget": 0.01, "note": note}]).reindex(
        columns=["model", "view", "damage", "budget", "cost_share", "metric", "plan_value", "note"]
    ).to_csv(tmp_path / "s.csv", index=False)
    (row,) = c5_rows([tmp_path / "s.csv"])
    assert row["state"] == "inconclusive" and "no plan within budget" in row["verdict"]


def test_heads_a_plan_does_not_name_run_exact(smollm2):
    """apply_plan runs the heads a plan leaves out with exact attention (never uninitialised output)."""
    n = 32
    ids = torch.randint(0, 1000, (2, n))
    exact = per_sequence(smollm2, ids, True, n // 2, 2)
    plan = _smollm2_plan(smollm2, n, lambda layer, h: (EXACT, "-", 0))
    plan.heads = [h for h in plan.heads if h.head != 3]
    try:
        apply_plan(smollm2, plan)
        planned = per_sequence(smollm2, ids, True, n // 2, 2)
    finally:
        detach(smollm2)
    np.testing.assert_allclose(planned, exact, rtol=1e-5)


def test_predictors_find_a_feature_that_decides_the_method():
    """The classifier predicts a method that a head's entropy decides, and Spearman's ρ sees it;
    on a shuffled assignment the accuracy falls to about the majority rate."""
    from eigenattn.reconstruction.plan_eval import predictors

    rng = np.random.default_rng(0)
    n = 120
    entropy = rng.random(n) * 4
    method = np.where(entropy > 2, "nystrom", "sink_window")
    heads = pd.DataFrame(
        {
            "damage_kind": "tv",
            "budget": 0.3,
            "method": method,
            "cost_share": np.where(entropy > 2, 0.27, 0.12),
            "entropy": entropy,
            "sink_mass": rng.random(n),
        }
    )
    p = predictors(heads, 0).iloc[0]
    assert p.classifier_accuracy > 0.9 and p.rho_entropy > 0.8 and abs(p.rho_sink_mass) < 0.3
    shuffled = heads.assign(method=rng.permutation(method), cost_share=rng.permutation(heads.cost_share))
    q = predictors(shuffled, 0).iloc[0]
    assert q.classifier_accuracy < 0.75 and abs(q.rho_entropy) < 0.3
