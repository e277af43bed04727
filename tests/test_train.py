"""Training variants: shapes, masks, gradients, equivalences, determinism and resuming."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, SNAKEMAKE, make_workdir, snakemake_env
from eigenattn.config.settings import EncoderModel, Training
from eigenattn.errors import InputError
from eigenattn.reconstruction.partial import (
    ATTR,
    LINFORMER_ATTR,
    Linformer,
    PartialMap,
    attach,
    attention_modules,
    partial_attention_forward,
)
from eigenattn.training.data import build_windows, mask_batch, split_texts, train_wordpiece
from eigenattn.training.loop import run
from eigenattn.training.model import MLM, attach_variant, encoder_config

n, L, H, D = 16, 2, 2, 32
MODEL = EncoderModel(layers=L, heads=H, d_model=D, d_ff=64, dropout=0.1, positions="rotary", init_range=0.1)
TRAINING = Training(
    vocab="wordpiece",
    vocab_size=600,
    model=MODEL,
    steps=20,
    finetune_steps=10,
    batch_size=4,
    lr=1e-3,
    finetune_lr=3e-4,
    weight_decay=0.01,
    warmup=0.1,
    log_every=5,
    eval_every=10,
    checkpoint_every=10,
    seq_len=n,
    data_seed=0,
    estimator="conditional_gaussian",
    strategy="pivoted_qr",
    ridge=1e-6,
    eigenspace_rank=0.5,
)
MAPS = {k: getattr(TRAINING, k) for k in ("estimator", "strategy", "ridge")}


class Stats:
    """A stand-in for RowStats: identity-free statistics of a random covariance per layer/head."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.seq_len, self.view, self.d, self.causal = n, "all", n, False
        self.layers = list(range(L))
        self.query_range, self.key_range = (0, n), (0, n)
        self.path = "synthetic"
        A = rng.standard_normal((L, H, n, n))
        C = A @ np.swapaxes(A, -1, -2)
        w, U = np.linalg.eigh(C)
        self._m = rng.standard_normal((L, H, n))
        self._U, self._w = U[..., ::-1].copy(), w[..., ::-1].copy()

    def head_stats(self, layer):
        return self._m[layer], self._U[layer], self._w[layer]


POSITIONS = ["rotary", "absolute"]


def model(variant="exact", s=4, seed=0, positions="rotary"):
    torch.manual_seed(seed)
    m = MLM(encoder_config(replace(MODEL, positions=positions), 50, n))
    attach_variant(
        m,
        variant,
        s,
        n,
        Stats() if variant in ("partial_fixed", "partial_learned", "subset_only") else None,
        **MAPS,
        rank=0.5,
        seed=0,
        pinv="exact",
    )
    return m


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (3, n), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return ids


TOK = {"special_ids": [0, 1, 2, 3, 4], "vocab_size": 50, "mask_id": 4}
VARIANTS = ["exact", "partial_fixed", "partial_learned", "subset_only", "linformer", "nystrom"]


def _qk_grads(mod):
    """The query and key weight gradients (ModernBERT's fused Wqkv: its q and k rows)."""
    if hasattr(mod, "Wqkv"):
        g = mod.Wqkv.weight.grad
        return None if g is None else g[: 2 * D]
    return None if mod.query.weight.grad is None else torch.cat([mod.query.weight.grad, mod.key.weight.grad])


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_gradients(variant, positions):
    m = model(variant, positions=positions).train()
    x, pos, labels = mask_batch(batch(), TOK, torch.Generator().manual_seed(1))
    loss, logits = m(x, pos, labels)
    assert logits.shape == (len(pos), 50) and loss.ndim == 0
    assert m.encoder(input_ids=x).last_hidden_state.shape == (3, n, D)
    loss.backward()
    for i, mod in attention_modules(m.encoder).items():
        g = _qk_grads(mod)
        assert g is not None and g.abs().sum() > 0
        pm = getattr(mod, ATTR, None)
        if variant in ("partial_fixed", "subset_only"):
            assert pm.W.grad is None and pm.b.grad is None and not pm.W.requires_grad
        if variant == "partial_learned":
            assert pm.W.grad is not None and pm.b.grad is not None and pm.W.grad.abs().sum() > 0
        if variant == "linformer":
            lf = getattr(mod, LINFORMER_ATTR)
            assert lf.E.grad is not None and lf.F.grad is not None
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert any(k.endswith(f"{ATTR}.W") for k in trainable) == (variant == "partial_learned")


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("variant", [*VARIANTS, "uniform"])
def test_attention_mask_is_honoured(variant, positions):
    """Masked keys get zero attention probability; Linformer refuses a mask it cannot apply."""
    m = model(variant, positions=positions).eval()
    mod = attention_modules(m.encoder)[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, n, D // H, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, n, n)
    mask[:, :, :, 5] = torch.finfo(torch.float32).min  # key 5 masked
    if variant == "linformer":
        with pytest.raises(InputError, match="cannot apply a padding or causal mask"):
            partial_attention_forward(mod, q, k, v, mask)
        return
    if variant == "nystrom":  # its landmarks mix every key: a hidden key is refused, not dropped
        with pytest.raises(InputError, match="mask hides keys of the view"):
            partial_attention_forward(mod, q, k, v, mask)
        return
    out, w = partial_attention_forward(mod, q, k, v, mask)
    assert out.shape == (2, n, H, D // H)
    pm = getattr(mod, ATTR, None)
    if pm is not None and pm.sparse:  # weights over the keys of T
        T = pm.T
        for h in range(H):
            if 5 in T[h].tolist():
                assert w[:, h, :, T[h].tolist().index(5)].abs().max() == 0
    else:
        assert w[..., 5].abs().max() == 0
    assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-5)


@torch.no_grad()
def test_uniform_floor_is_the_mean_of_the_values_and_ignores_order():
    """The floor's attention: every visible key weighs 1/n, so each output is the mean of V; and a
    rotary encoder with it is permutation-equivariant (position i's output moves with its token),
    which exact attention with RoPE is not."""
    m = model("uniform").eval()
    mod = attention_modules(m.encoder)[0]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, H, n, D // H, generator=g) for _ in range(3))
    out, w = partial_attention_forward(mod, q, k, v, None, dropout=0.0)
    torch.testing.assert_close(w, torch.full_like(w, 1 / n))
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(v).transpose(1, 2))
    ids = batch()
    perm = torch.randperm(n, generator=g)
    for variant, equivariant in (("uniform", True), ("exact", False)):
        enc = model(variant).eval().encoder
        a = enc(input_ids=ids).last_hidden_state[:, perm]
        b = enc(input_ids=ids[:, perm]).last_hidden_state
        assert torch.allclose(a, b, atol=1e-5) == equivariant, variant
    assert not any(p.grad is not None for p in mod.parameters())


@torch.no_grad()
@pytest.mark.parametrize("positions", POSITIONS)
def test_partial_fixed_with_all_keys_equals_exact(positions):
    exact = model("exact", positions=positions).eval()
    ids = batch()
    want = exact.encoder(input_ids=ids).last_hidden_state
    maps = {
        i: PartialMap(
            np.tile(np.arange(n), (H, 1)),
            np.broadcast_to(np.eye(n), (H, n, n)),
            np.zeros((H, n)),
            seq_len=n,
            query_range=(0, n),
            key_range=(0, n),
        )
        for i in range(L)
    }
    attach(exact.encoder, maps)
    got = exact.encoder(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() <= 1e-5
    # and the full pipeline at s = n: conditional Gaussian with T = all keys is the identity
    m = model("partial_fixed", s=n, positions=positions).eval()
    ref = model("exact", positions=positions).eval()
    assert (
        m.encoder(input_ids=ids).last_hidden_state - ref.encoder(input_ids=ids).last_hidden_state
    ).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("positions", POSITIONS)
def test_linformer_identity_equals_exact(positions):
    m = model("exact", positions=positions).eval()
    ids = batch()
    want = m.encoder(input_ids=ids).last_hidden_state
    for mod in attention_modules(m.encoder).values():
        setattr(mod, LINFORMER_ATTR, Linformer(n, n, identity=True))
    got = m.encoder(input_ids=ids).last_hidden_state
    assert (got - want).abs().max() <= 1e-5


def test_mask_batch_proportions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (200, 64), generator=g)
    ids[:, 0] = 2
    x, pos, labels = mask_batch(ids, TOK, torch.Generator().manual_seed(3))
    assert abs(len(pos) / ids[:, 1:].numel() - 0.15) < 0.01
    assert not bool((ids.flatten()[pos] == 2).any())  # specials are never predicted
    xs = x.flatten()[pos]
    assert abs(float((xs == 4).float().mean()) - 0.8) < 0.03
    kept = float((xs == labels).float().mean())
    assert 0.07 < kept < 0.14  # 10% kept, plus random draws that hit the same token
    x2, pos2, _ = mask_batch(ids, TOK, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(pos, pos2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, resources):
    docs = resources / "corpora" / "enwiki-sample" / "documents.parquet"
    out = tmp_path_factory.mktemp("tok")
    train_wordpiece(split_texts(docs, 0, 0.2)["fit"][:20], 600, out, 32)
    counts = build_windows(out, docs, 32, 0, 0.2, 8, out / "windows.npz")
    assert counts["fit"] > 1000 and counts["heldout"] == 8
    return out, out / "windows.npz"


def test_same_seed_same_metrics(tokenizer, tmp_path):
    tok, windows = tokenizer
    kw = dict(
        mode="scratch",
        variant="exact",
        s=32,
        seed=3,
        settings=replace(TRAINING, seq_len=32, data_seed=0),
        tokenizer_dir=tok,
        windows=windows,
        progress=False,
    )
    a = run(tmp_path / "a", **kw)
    b = run(tmp_path / "b", **kw)
    ma, mb = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    pd.testing.assert_frame_equal(ma.drop(columns="step_time_ms"), mb.drop(columns="step_time_ms"))
    assert a["heldout_mlm_acc"] == b["heldout_mlm_acc"] and len(ma) == 4
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    assert (tmp_path / "a" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "model" / "config.json").is_file()
    c = run(tmp_path / "c", **{**kw, "seed": 4})
    assert c["heldout_loss"] != a["heldout_loss"]
    # the per-token record: the same tokens in the same order for every run, its accuracy the run's
    za, zc = (np.load(tmp_path / x / "heldout_tokens.npz") for x in ("a", "c"))
    np.testing.assert_array_equal(za["labels"], zc["labels"])
    assert za["correct"].dtype == bool and len(za["correct"]) == a["heldout_tokens"]
    assert za["correct"].mean() == pytest.approx(a["heldout_mlm_acc"], abs=1e-12)
    assert float(za["loss"].astype(np.float64).mean()) == pytest.approx(a["heldout_loss"], rel=1e-6)
    assert za["correct_shuffled"].mean() == pytest.approx(a["heldout_mlm_acc_shuffled"], abs=1e-12)


def test_runs_of_a_seed_share_their_initialisation():
    """Paired seeds: every variant of a seed starts from the same encoder weights (its own extra
    parameters, such as Linformer's E and F, are drawn after them); another seed starts elsewhere."""
    from eigenattn.training.loop import _build_model

    settings = replace(TRAINING, seq_len=n)

    def weights(variant, seed):
        m = _build_model("scratch", variant, 4, seed, settings, 50, Stats(), None)
        return {k: v for k, v in m.state_dict().items() if "eigenattn" not in k}

    ref = weights("exact", 3)
    for variant in ("uniform", "linformer", "nystrom", "partial_fixed"):
        w = weights(variant, 3)
        assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref), variant
    other = weights("exact", 4)
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def test_nystrom_trains_and_resumes_from_a_checkpoint(tokenizer, tmp_path, monkeypatch):
    """The Nyström variant learns, and a run that dies after its step-10 checkpoint resumes from it
    to the same metrics as an uninterrupted run."""
    import eigenattn.training.loop as loop

    tok, windows = tokenizer
    kw = dict(
        mode="scratch",
        variant="nystrom",
        s=8,
        seed=3,
        settings=replace(TRAINING, seq_len=32, data_seed=0, steps=30, pinv="exact"),
        tokenizer_dir=tok,
        windows=windows,
        progress=False,
    )
    a = run(tmp_path / "a", **kw)
    ma = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert ma.train_loss.iloc[-1] < ma.train_loss.iloc[0] - 0.1 and np.isfinite(a["heldout_loss"])
    real, calls = loop.evaluate, []

    def dies_at_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", dies_at_the_second_evaluation)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "b", **kw)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 10
    monkeypatch.setattr(loop, "evaluate", real)
    b = run(tmp_path / "b", **kw)
    mb = pd.read_csv(tmp_path / "b" / "metrics.csv")
    pd.testing.assert_frame_equal(ma.drop(columns="step_time_ms"), mb.drop(columns="step_time_ms"), atol=1e-5)
    assert b["heldout_mlm_acc"] == pytest.approx(a["heldout_mlm_acc"], abs=1e-6)


def test_sigkill_resumes_from_checkpoint(tmp_path, resources):
    """A training job killed with SIGKILL resumes from its last checkpoint when the target is re-run."""
    wd = make_workdir(tmp_path, resources)
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(
        yaml.safe_dump({"training": {"steps": 250, "log_every": 10, "checkpoint_every": 10, "eval_every": 250}})
    )
    target = "results/training/scratch/exact/s32/seed0/final.json"
    cmd = [
        *SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(wd),
        "-c1",
        target,
        "--configfile",
        str(REPO / "config.yaml"),
        str(REPO / "tests" / "config.yaml"),
        str(cfg),
    ]
    proc = subprocess.Popen(
        cmd, cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=snakemake_env()
    )
    ckpt = wd / "results/training/scratch/exact/s32/seed0/checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (wd / target).exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 250
    # a killed Snakemake leaves its lock behind: unlock, then re-run the target
    env = snakemake_env()
    subprocess.run(cmd + ["--unlock"], cwd=wd, capture_output=True, text=True, timeout=120, check=True, env=env)
    done = subprocess.run(
        cmd + ["--rerun-incomplete"], cwd=wd, capture_output=True, text=True, timeout=600, env=snakemake_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = (wd / "logs/train/scratch/exact/s32/seed0.log").read_text()
    assert "resumed from checkpoint" in log and f"at step {torch.tensor(step).item()}" in log
    m = pd.read_csv(wd / "results/training/scratch/exact/s32/seed0/metrics.csv")
    assert list(m.step) == list(range(10, 251, 10)) and not ckpt.exists()


def test_wordpiece_is_identical_across_processes(resources, tmp_path):
    """The tokenizers library numbers the trained pieces differently in each process; after the
    canonical renumbering two processes write the same vocabulary file."""
    code = (
        "import sys; from eigenattn.training.data import split_texts, train_wordpiece; "
        "t = split_texts(sys.argv[1], 0, 0.2)['fit'][:40]; train_wordpiece(t, 600, sys.argv[2], 32)"
    )
    docs = resources / "corpora" / "enwiki-sample" / "documents.parquet"
    for i in (1, 2):
        subprocess.run([sys.executable, "-c", code, str(docs), str(tmp_path / f"t{i}")], check=True)
    a, b = ((tmp_path / f"t{i}" / "tokenizer.json").read_bytes() for i in (1, 2))
    assert a == b
