"""Streamed statistics (docs/method.md §14): row moments from the forward pass equal those of the
stored scores, shards merge exactly, token stores recompute the stored scores, and the planner
streams what would not fit."""

import numpy as np
import pandas as pd
import pytest
import torch

from eigenattn.capture.extract import extract_scores
from eigenattn.capture.recompute import RecomputedScores, extract_tokens, open_token_shard
from eigenattn.config import plan
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.moments import merge_packed, unpack
from eigenattn.spectra.stores import run_rows, run_rows_streamed
from eigenattn.spectra.streamed import _Moments, layer_group, merge_moment_files, stream_moments
from eigenattn.storage.sizes import moment_layer_bytes
from eigenattn.storage.store import open_scores, open_store

SEQ_LEN = 24


def _texts(resources, k):
    docs = pd.read_parquet(resources / "corpora" / "enwiki-sample" / "documents.parquet")
    words = " ".join(docs["text"].iloc[:6]).split()
    return [" ".join(words[i * SEQ_LEN : (i + 1) * SEQ_LEN]) for i in range(k)]


def test_merge_of_four_shards_equals_one_pass_and_numpy():
    rng = np.random.default_rng(0)
    L, H, d = 2, 3, 7
    rows = [rng.normal(3.0, 2.0, (H, 5 + i % 3, d)) for i in range(16)]  # 16 sequences of rows
    one = _Moments(L, H, d, "cpu")
    shards = [_Moments(L, H, d, "cpu") for _ in range(4)]
    for i, X in enumerate(rows):
        for layer in range(L):
            one.add(layer, torch.from_numpy(X * (layer + 1)))
            shards[i // 4].add(layer, torch.from_numpy(X * (layer + 1)))
    merged = merge_packed(np.stack([s.packed() for s in shards]), axis=0, keepdims=False)
    whole = one.packed()
    np.testing.assert_allclose(merged, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    count, mean, m2 = unpack(whole)
    X = np.concatenate(rows, axis=1)  # (H, all rows, d)
    for layer in range(L):
        for h in range(H):
            Y = X[h] * (layer + 1)
            assert count[layer, h] == len(Y)
            np.testing.assert_allclose(mean[layer, h], Y.mean(0), rtol=1e-12)
            np.testing.assert_allclose(m2[layer, h] / (len(Y) - 1), np.cov(Y.T), rtol=1e-10)


def test_four_shards_of_a_real_model_merge_to_one_pass(resources, tmp_path):
    """minilm's moments streamed as 4 sequence shards and merged equal one pass over all 8
    sequences, 1e-12 relative, both halves and both variants."""
    model_dir = resources / "models" / "minilm"
    texts = _texts(resources, 8)
    common = dict(
        seq_len=SEQ_LEN,
        layers=[0, 3],
        group=0,
        n_groups=1,
        views=["all", "prefix"],
        split_sequence=4,
        batch_size=2,
        device="cpu",
        autocast="none",
        attrs={"model": "minilm"},
        progress=False,
    )
    stream_moments(model_dir, texts, np.arange(8), tmp_path / "one.zarr", first_index=0, **common)
    parts = []
    for i in range(4):
        out = tmp_path / f"part{i}.zarr"
        stream_moments(
            model_dir, texts[2 * i : 2 * i + 2], np.arange(2 * i, 2 * i + 2), out, first_index=2 * i, **common
        )
        parts.append(out)
    for view in ("all", "prefix"):
        one, _ = merge_moment_files([tmp_path / "one.zarr"], view, ["raw", "row_centered"])
        four, attrs = merge_moment_files(parts, view, ["raw", "row_centered"])
        assert attrs["n_sequences"] == 8
        for v in ("raw", "row_centered"):
            for h in "ab":
                np.testing.assert_allclose(four[v][h], one[v][h], rtol=1e-12, atol=1e-12 * np.abs(one[v][h]).max())


def test_streamed_probe_runs_on_a_prefix_and_batches_are_checked_at_full_length(resources, tmp_path, monkeypatch):
    """Streamed mode probes STREAM_PROBE_LEN tokens (the probe holds every layer's scores twice);
    the moments are those of the full-length probe, and every batch's masks are checked at the
    full length against the probe's."""
    import eigenattn.spectra.streamed as streamed

    model_dir = resources / "models" / "smollm2"
    texts = _texts(resources, 4)
    common = dict(
        seq_len=SEQ_LEN,
        layers=[0, 2],
        group=0,
        n_groups=1,
        views=["prefix"],
        first_index=0,
        split_sequence=2,
        batch_size=2,
        device="cpu",
        autocast="none",
        attrs={"model": "smollm2"},
        progress=False,
    )
    stream_moments(model_dir, texts, np.arange(4), tmp_path / "full.zarr", **common)
    monkeypatch.setattr(streamed, "STREAM_PROBE_LEN", 8)
    stream_moments(model_dir, texts, np.arange(4), tmp_path / "prefix.zarr", **common)
    a, b = open_store(tmp_path / "full.zarr"), open_store(tmp_path / "prefix.zarr")
    assert a.attrs["equivalence_probe"]["tokens"] == SEQ_LEN and b.attrs["equivalence_probe"]["tokens"] == 8
    assert b.attrs["layer_masks"] == a.attrs["layer_masks"] == [{"kind": "causal"}] * 2
    for h in "ab":
        np.testing.assert_array_equal(np.asarray(b[f"prefix/{h}"][...]), np.asarray(a[f"prefix/{h}"][...]))


def test_layer_groups_cover_the_kept_layers_and_refuse_too_many():
    keep = [0, 1, 15, 29]
    assert [layer_group(keep, g, 3) for g in range(3)] == [[0], [1], [15, 29]]
    assert sum((layer_group(keep, g, 2) for g in range(2)), []) == keep
    with pytest.raises(ConfigError, match="extraction.layer_groups"):
        layer_group(keep, 0, 5)


@pytest.mark.parametrize("name,views", [("minilm", ["all", "prefix"]), ("smollm2", ["prefix"])])
def test_streamed_rows_equal_stored_float32_rows(resources, tmp_path, name, views):
    """Two layer groups × two sequence shards, streamed, against one float32 score store: the
    same row and half stores (eigenvalues 1e-9 relative) with no score written."""
    model_dir = resources / "models" / name
    N, chunk = 8, 2
    texts = _texts(resources, N)
    layers = [0, 1, 2] if name == "minilm" else [0, 1, 29]
    store = tmp_path / "fit.zarr"
    extract_scores(
        model_dir,
        texts,
        np.arange(N),
        store,
        seq_len=SEQ_LEN,
        dtype="float32",
        batch_size=chunk,
        chunk_sequences=chunk,
        device="cpu",
        autocast="none",
        layers=layers,
        compression="none",
        attrs={"model": name, "split": "fit", "seed": 0, "corpus": "c"},
        progress=False,
    )
    split = plan.fit_halves_split(
        {
            "sampling": {"n_sequences": {"fit": N}},
            "extraction": {"shards": 2, "chunk_sequences": chunk, "batch_size": chunk},
        }
    )
    assert split == 4
    moments = []
    for g in range(2):
        for shard, (lo, hi) in enumerate([(0, 4), (4, 8)]):
            out = tmp_path / f"m-{g}-{shard}.zarr"
            stream_moments(
                model_dir,
                texts[lo:hi],
                np.arange(lo, hi),
                out,
                seq_len=SEQ_LEN,
                layers=layers,
                group=g,
                n_groups=2,
                views=views,
                first_index=lo,
                split_sequence=split,
                batch_size=chunk,  # as the store: a float32 forward pass is not batch-invariant
                device="cpu",
                autocast="none",
                attrs={"model": name, "split": "fit", "seed": 0, "corpus": "c"},
                progress=False,
            )
            moments.append(str(out))
    for view in views:
        a = run_rows(
            [str(store)],
            tmp_path / f"s-{view}.zarr",
            view,
            ["raw", "row_centered"],
            2,
            halves_path=tmp_path / f"sh-{view}.zarr",
        )
        b = run_rows_streamed(
            moments,
            tmp_path / f"t-{view}.zarr",
            view,
            ["raw", "row_centered"],
            tmp_path / f"th-{view}.zarr",
            expect={"model": name, "split": "fit", "dtype": "float16"},
        )
        for v in ("raw", "row_centered"):
            pairs = [(a[v], b[v])] + [(a[v]["halves"][h], b[v]["halves"][h]) for h in "ab"]
            for x, y in pairs:
                for scope in ("heads", "pooled"):
                    wx, wy = x[scope]["eigenvalues"], y[scope]["eigenvalues"]
                    np.testing.assert_allclose(wy, wx, rtol=1e-9, atol=1e-9 * wx.max())
                    np.testing.assert_allclose(y[scope]["mean"], x[scope]["mean"], rtol=1e-9, atol=1e-12)
                    assert (y[scope]["count"] == x[scope]["count"]).all()
            assert b[v]["halves"]["split_sequence"] == a[v]["halves"]["split_sequence"] == split
        rows = open_store(tmp_path / f"t-{view}.zarr")
        assert rows.attrs["route"] == "streamed" and rows.attrs["layers"] == layers
    # the moments stores hold no scores, and their size does not depend on N
    m = open_store(moments[0])
    assert "scores" not in m and m.attrs["analysis"] == "streamed_moments"


def test_moment_bytes_do_not_depend_on_the_sequences(resources, tmp_path):
    model_dir = resources / "models" / "minilm"
    sizes = []
    for N in (2, 6):
        out = tmp_path / f"m{N}.zarr"
        stream_moments(
            model_dir,
            _texts(resources, N),
            np.arange(N),
            out,
            seq_len=SEQ_LEN,
            layers=[0, 5],
            group=0,
            n_groups=1,
            views=["prefix"],
            first_index=0,
            split_sequence=1,
            batch_size=2,
            device="cpu",
            autocast="none",
            attrs={"model": "minilm"},
            progress=False,
        )
        sizes.append(sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "zarr.json" not in p.name))
    assert abs(sizes[0] - sizes[1]) <= 0.01 * sizes[0], sizes
    d = SEQ_LEN // 2
    assert sizes[0] <= 2 * moment_layer_bytes(12, [d])  # two layers, uncompressed at most


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_token_store_recomputes_the_stored_scores(resources, tmp_path, name):
    model_dir = resources / "models" / name
    N = 5
    texts = _texts(resources, N)
    layers = [1, 3]
    common = {"seq_len": SEQ_LEN, "layers": layers, "device": "cpu", "autocast": "none"}
    attrs = {"model": name, "split": "heldout", "seed": 0, "corpus": "c"}
    extract_scores(
        model_dir,
        texts,
        np.arange(N),
        tmp_path / "s.zarr",
        dtype="float32",
        batch_size=2,
        chunk_sequences=2,
        compression="none",
        attrs=attrs,
        progress=False,
        **common,
    )
    extract_tokens(
        model_dir,
        texts,
        np.arange(N),
        tmp_path / "t.zarr",
        chunk_sequences=2,
        dtype_requested="auto",
        attrs=attrs,
        **common,
    )
    stored, sa = open_scores([tmp_path / "s.zarr"])
    expect = {"model": name, "split": "heldout", "seq_len": SEQ_LEN, "dtype_requested": "auto"}
    recomputed, ta = open_scores([tmp_path / "t.zarr"], expect, recompute=open_token_shard)
    assert recomputed.shape == stored.shape and ta["layers"] == sa["layers"] == layers
    assert ta["layer_masks"] == sa["layer_masks"] and ta["causal"] == sa["causal"]
    np.testing.assert_allclose(recomputed[1:4, 1].compute(), stored[1:4, 1].compute(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(recomputed.compute(), stored.compute(), rtol=1e-6, atol=1e-6)
    # a stage that reads stored scores only says what the token store is
    with pytest.raises(InputError, match="token store"):
        open_scores([tmp_path / "t.zarr"])
    rs = open_token_shard(tmp_path / "t.zarr", ta)
    assert isinstance(rs, RecomputedScores) and rs[0, 0].shape == (stored.shape[2], SEQ_LEN, SEQ_LEN)


def _cfg(seq_len=2048, **extraction):
    """The default config, smollm2 alone at ``seq_len``, with ``extraction`` overrides."""
    import yaml

    from conftest import REPO
    from eigenattn.config.validation import validate

    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["run_models"] = ["smollm2"]
    c["sampling"]["seq_len"] = seq_len
    c["extraction"].update(extraction)
    return validate(c)


def test_auto_streams_a_model_whose_stores_exceed_the_budget():
    big = _cfg(store="auto")
    assert plan.main_store_bytes(big, "smollm2") > 900e9
    assert plan.store_mode(big, "smollm2") == "stream"
    assert plan.store_mode(_cfg(store="scores"), "smollm2") == "scores"
    assert plan.store_mode(_cfg(128, store="auto"), "smollm2") == "scores"
    # layer groups keep each job's moments within stream_memory_gb. By hand: the prefix view at
    # n = 2,048 has d = 1,024 keys; per layer, 9 heads × 2 halves × 8 B × (1,024 + 2) × 1,024 (the
    # shift, the sum and the product sum) = 151.3 MB, so 4 GB holds 26 layers and smollm2's 30
    # take 2 groups (of 15); 1 GB holds 6, so 5 groups of 6
    assert moment_layer_bytes(9, [1024]) == 9 * 2 * 8 * 1026 * 1024 == 151_289_856
    assert plan.layer_groups(big, "smollm2") == 2
    assert plan.layer_groups(_cfg(stream_memory_gb=1), "smollm2") == 5
    assert [len(layer_group(list(range(30)), g, 5)) for g in range(5)] == [6] * 5
    assert plan.layer_groups(_cfg(layer_groups=7), "smollm2") == 7


# --- the workflow, stored against streamed (tests/config.yaml with float32 stores) -----------------


def test_streamed_run_writes_no_score_store(routes):
    wd, _, proc = routes
    assert "streamed (extraction.store: stream)" in proc.stderr
    for m in ("minilm", "smollm2"):
        assert list((wd / "results" / "moments" / m).glob("group-*/shard-*.zarr"))
        assert list((wd / "results" / "tokens" / m / "heldout").glob("shard-*.zarr"))


@pytest.mark.parametrize("model,view", [("minilm", "all"), ("minilm", "prefix"), ("smollm2", "prefix")])
def test_streamed_and_stored_rows_and_halves_agree(routes, model, view):
    import zarr

    wd, kept, _ = routes
    for store in ("rows.zarr", "halves.zarr"):
        a = zarr.open_group(kept / "eigen" / model / view / store, mode="r")
        b = zarr.open_group(wd / "results" / "eigen" / model / view / store, mode="r")
        assert b.attrs["route"] == "streamed" and a.attrs["route"] == "stored"
        groups = (
            ["raw", "row_centered"]
            if store == "rows.zarr"
            else [f"{v}/{h}" for v in ("raw", "row_centered") for h in "ab"]
        )
        for g in groups:
            for scope in ("", "pooled/"):
                wa = np.asarray(a[f"{g}/{scope}eigenvalues"][...])
                wb = np.asarray(b[f"{g}/{scope}eigenvalues"][...])
                np.testing.assert_allclose(wb, wa, rtol=1e-9, atol=1e-9 * wa.max())
                Ua, Ub = np.asarray(a[f"{g}/{scope}eigenvectors"][...]), np.asarray(b[f"{g}/{scope}eigenvectors"][...])
                # overlap of the top-4 subspaces: 1 within rounding (eigenvectors of near-equal
                # eigenvalues may rotate inside their span)
                k = 4
                ov = (np.matmul(np.swapaxes(Ua[..., :k], -1, -2), Ub[..., :k]) ** 2).sum((-2, -1)) / k
                np.testing.assert_allclose(ov, 1.0, atol=1e-6)


def test_streamed_and_stored_tables_and_claims_agree(routes):
    wd, kept, _ = routes
    for rel in ("eigen/smollm2/prefix/spectrum.csv", "eigen/minilm/all/spectrum.csv"):
        a, b = pd.read_csv(kept / rel), pd.read_csv(wd / "results" / rel)
        assert set(b.analysis) == {"rows"}  # streamed mode: no full-matrix spectra (docs/method.md §14)
        a = a[a.analysis == "rows"].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, rtol=1e-9, atol=1e-9, check_dtype=False)
    pd.testing.assert_frame_equal(
        pd.read_csv(kept / "overlap/summary.csv"),
        pd.read_csv(wd / "results/overlap/summary.csv"),
        rtol=1e-9,
        atol=1e-9,
        check_dtype=False,
    )
    for rel in ("reconstruction/minilm/all.csv", "reconstruction/smollm2/prefix.csv"):
        a, b = pd.read_csv(kept / rel), pd.read_csv(wd / "results" / rel)
        # nystrom's exact pseudo-inverse of an ill-conditioned kernel amplifies the last bits
        ill = (a.estimator == "nystrom") & (a.strategy == "exact")
        pd.testing.assert_frame_equal(
            a[~ill].reset_index(drop=True), b[~ill.to_numpy()].reset_index(drop=True), rtol=1e-6, atol=1e-9
        )
    a, b = pd.read_csv(kept / "claims.csv"), pd.read_csv(wd / "results" / "claims.csv")
    full_a, full_b = a.scope.str.contains("full matrices"), b.scope.str.contains("full matrices")
    streamed = b[full_b]
    assert len(streamed) == 3 and (streamed.state == "reference").all(), streamed
    assert streamed.verdict.str.contains("streamed mode").all()
    assert streamed.scope.str.contains("N=12").all(), streamed.scope  # tests/config.yaml: 12 fit sequences
    a, b = a[~full_a].reset_index(drop=True), b[~full_b].reset_index(drop=True)
    assert len(a) == len(b) and (a.claim == b.claim).all()
    differ = a.state.to_numpy() != b.state.to_numpy()
    assert not differ.any(), pd.concat([a[["claim", "model", "view", "state"]], b.state.rename("streamed")], axis=1)[
        differ
    ]


def test_a_window_longer_than_the_probe_is_recorded_at_full_length(tmp_path, monkeypatch):
    """A tiny Mistral whose sliding window (4) covers the whole probe (4 tokens) but not seq_len
    (24): the probe alone would call it causal. The streamed moments and the token store record
    the window the layers receive at the full length, and the recomputed scores equal the stored."""
    import eigenattn.capture.recompute as recompute
    import eigenattn.spectra.streamed as streamed
    from tiny_models import WINDOW, build, texts

    model_dir = build("mistral", tmp_path / "mistral")
    monkeypatch.setattr(streamed, "STREAM_PROBE_LEN", WINDOW)
    monkeypatch.setattr(recompute, "STREAM_PROBE_LEN", WINDOW)
    want = [{"kind": "sliding_window", "window": WINDOW}] * 2
    passages = texts(4, words=SEQ_LEN)
    attrs = {"model": "mistral", "split": "fit", "seed": 0, "corpus": "c"}
    stream_moments(
        model_dir,
        passages,
        np.arange(4),
        tmp_path / "m.zarr",
        seq_len=SEQ_LEN,
        layers="all",
        group=0,
        n_groups=1,
        views=["prefix"],
        first_index=0,
        split_sequence=2,
        batch_size=2,
        device="cpu",
        autocast="none",
        attrs=attrs,
        progress=False,
    )
    m = open_store(tmp_path / "m.zarr")
    assert m.attrs["layer_masks"] == want and m.attrs["causal"] is True
    assert m.attrs["equivalence_probe"]["tokens"] == WINDOW
    common = {"seq_len": SEQ_LEN, "layers": "all", "device": "cpu", "autocast": "none", "attrs": attrs}
    extract_tokens(
        model_dir, passages, np.arange(4), tmp_path / "t.zarr", chunk_sequences=2, dtype_requested="auto", **common
    )
    extract_scores(
        model_dir,
        passages,
        np.arange(4),
        tmp_path / "s.zarr",
        dtype="float32",
        batch_size=2,
        chunk_sequences=2,
        compression="none",
        progress=False,
        **common,
    )
    stored, sa = open_scores([tmp_path / "s.zarr"])
    recomputed, ta = open_scores([tmp_path / "t.zarr"], recompute=open_token_shard)
    assert sa["layer_masks"] == ta["layer_masks"] == want
    np.testing.assert_allclose(recomputed.compute(), stored.compute(), rtol=1e-6, atol=1e-6)


def test_autocast_is_recorded_checked_and_applied_on_every_route(resources, tmp_path, monkeypatch):
    """extraction.autocast: every route records it (``autocast_requested``; ``autocast`` is what the
    scores were computed with, none off CUDA), a reader expecting another refuses the store, shards
    written with different autocasts do not mix, and recomputed scores apply the token store's."""
    import eigenattn.capture.recompute as recompute

    model_dir = resources / "models" / "minilm"
    texts = _texts(resources, 4)
    attrs = {"model": "minilm", "split": "fit", "seed": 0, "corpus": "c"}
    common = {"seq_len": SEQ_LEN, "layers": [0, 1], "device": "cpu", "attrs": attrs}
    moments = dict(group=0, n_groups=1, views=["prefix"], split_sequence=1, batch_size=2, progress=False, **common)
    for name, ac in (("m0", "bf16"), ("m1", "none")):
        stream_moments(
            model_dir, texts[:2] if name == "m0" else texts[2:], np.arange(2), tmp_path / f"{name}.zarr",
            first_index=0 if name == "m0" else 2, autocast=ac, **moments,
        )  # fmt: skip
    m0 = open_store(tmp_path / "m0.zarr").attrs
    assert (m0["autocast"], m0["autocast_requested"]) == ("none", "bf16")  # CPU: float32 forward
    with pytest.raises(InputError, match="autocast_requested"):
        merge_moment_files([tmp_path / "m0.zarr"], "prefix", ["raw"], expect={"autocast_requested": "none"})
    merge_moment_files([tmp_path / "m0.zarr"], "prefix", ["raw"], expect={"autocast_requested": "bf16"})
    with pytest.raises(InputError, match="autocast"):  # two shards of one merge, two autocasts
        merge_moment_files([tmp_path / "m0.zarr", tmp_path / "m1.zarr"], "prefix", ["raw"])
    extract_tokens(
        model_dir, texts, np.arange(4), tmp_path / "t.zarr", chunk_sequences=2, dtype_requested="auto",
        autocast="bf16", **common,
    )  # fmt: skip
    extract_scores(
        model_dir, texts, np.arange(4), tmp_path / "s.zarr", dtype="float32", batch_size=2, chunk_sequences=2,
        autocast="fp16", compression="none", progress=False, **common,
    )  # fmt: skip
    s = open_store(tmp_path / "s.zarr").attrs
    assert (s["autocast"], s["autocast_requested"]) == ("none", "fp16")
    with pytest.raises(InputError, match="autocast_requested"):
        open_scores([tmp_path / "s.zarr"], {"autocast_requested": "none"})
    with pytest.raises(InputError, match="autocast_requested"):
        open_scores([tmp_path / "t.zarr"], {"autocast_requested": "none"}, recompute=open_token_shard)
    scores, ta = open_scores([tmp_path / "t.zarr"], {"autocast_requested": "bf16"}, recompute=open_token_shard)
    applied = []
    real = recompute.autocast_context

    def spy(autocast, device):
        applied.append((autocast, torch.device(device).type))
        return real(autocast, device)

    monkeypatch.setattr(recompute, "autocast_context", spy)
    scores[0:2, 0].compute()
    assert applied and set(applied) == {("bf16", "cpu")}
    with pytest.raises(ConfigError, match="extraction.autocast"):
        extract_tokens(
            model_dir, texts, np.arange(4), tmp_path / "x.zarr", chunk_sequences=2, dtype_requested="auto",
            autocast="fp8", **common,
        )  # fmt: skip


def test_one_chunk_in_streamed_mode_is_the_stored_routes_config_error(resources, tmp_path):
    """Split-half statistics need two chunks on both routes: with one, streamed mode says so under
    extraction.chunk_sequences, as the stored route does, instead of 'fewer than 2 samples'."""
    N = 2
    cfg = {"sampling": {"n_sequences": {"fit": N}}, "extraction": {"shards": 1, "chunk_sequences": 2, "batch_size": 2}}
    split = plan.fit_halves_split(cfg)
    assert split == N  # one chunk: half b is empty
    out = tmp_path / "m.zarr"
    stream_moments(
        resources / "models" / "minilm", _texts(resources, N), np.arange(N), out, seq_len=SEQ_LEN, layers=[0],
        group=0, n_groups=1, views=["prefix"], first_index=0, split_sequence=split, batch_size=2, device="cpu",
        autocast="none",
        attrs={"model": "minilm"}, progress=False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"extraction.chunk_sequences(.|\n)*at least 2 sequence chunks"):
        run_rows_streamed([str(out)], tmp_path / "r.zarr", "prefix", ["raw"], tmp_path / "h.zarr")
    with pytest.raises(ConfigError, match="extraction.chunk_sequences"):  # the stored route's
        from eigenattn.spectra.moments import half_block_index

        half_block_index((2,))


def test_recomputed_scores_run_the_model_once_per_chunk(resources, tmp_path):
    """Read layer by layer, chunk by chunk (as the reconstruction and per-input spectra do), a
    token store of 3 layers and 2 chunks runs the model twice, once per chunk up to its last
    layer, not once per (chunk, layer); with no room to hold blocks ahead, once per read again.
    The scores are the same either way."""
    model_dir = resources / "models" / "minilm"
    texts = _texts(resources, 4)
    extract_tokens(
        model_dir, texts, np.arange(4), tmp_path / "t.zarr", seq_len=SEQ_LEN, layers=[0, 2, 4], chunk_sequences=2,
        dtype_requested="auto", device="cpu", autocast="none", attrs={"model": "minilm", "split": "heldout"},
    )  # fmt: skip
    attrs = open_store(tmp_path / "t.zarr").attrs.asdict()
    ids = open_store(tmp_path / "t.zarr")["input_ids"][:]
    ahead = RecomputedScores(tmp_path / "t.zarr", attrs, ids)
    blocks = {(li, s0): ahead[s0 : s0 + 2, li] for li in range(3) for s0 in (0, 2)}
    assert ahead.forwards == [(2, 4), (2, 4)]
    assert not ahead._cache and ahead._held == 0  # every block read, none held
    one = RecomputedScores(tmp_path / "t.zarr", attrs, ids, cache_bytes=0)
    for (li, s0), block in blocks.items():
        np.testing.assert_array_equal(one[s0 : s0 + 2, li], block)
    assert one.forwards == [(2, 0), (2, 0), (2, 2), (2, 2), (2, 4), (2, 4)]
    # readers that take only some layers say so: nothing deeper is computed ahead
    some = RecomputedScores(tmp_path / "t.zarr", attrs, ids)
    some.needs([0, 1])
    for li in (0, 1):
        for s0 in (0, 2):
            np.testing.assert_array_equal(some[s0 : s0 + 2, li], blocks[(li, s0)])
    assert some.forwards == [(2, 2), (2, 2)]
    # Dask's threads, reading every block at once: one pass per chunk as well
    scores, _ = open_scores([tmp_path / "t.zarr"], recompute=open_token_shard)
    whole = scores.compute(scheduler="threads", num_workers=4)
    for (li, s0), block in blocks.items():
        np.testing.assert_array_equal(whole[s0 : s0 + 2, li], block)


def test_float32_products_stay_within_their_derived_bound():
    """float32 products of the shifted rows, accumulated in float64 per sequence: every eigenvalue
    of each head's M2 within the bound of float32_product_bound of the float64 one (and far inside
    it: the bound is the worst case, the error grows as √m, not m). Rows of 1,024 queries × 512
    keys of scores ~ N(3, 2), with a low-rank part as attention rows have."""
    rng = np.random.default_rng(0)
    H, m, d = 2, 1024, 512
    exact, fast = _Moments(1, H, d, "cpu"), _Moments(1, H, d, "cpu", products="float32")
    basis = rng.normal(size=(H, 8, d))
    for _ in range(3):
        X = 3.0 + rng.normal(0, 2, (H, m, d)) * 0.3 + np.einsum("hmk,hkd->hmd", rng.normal(0, 2, (H, m, 8)), basis)
        X = torch.from_numpy(X.astype(np.float32))
        exact.add(0, X)
        fast.add(0, X)
    _, mean64, m64 = (t.numpy() for t in exact.moments())
    _, mean32, m32 = (t.numpy() for t in fast.moments())
    bound = fast.product_bound()[0]  # (heads,)
    for h in range(H):
        w64, w32 = np.linalg.eigvalsh(m64[0, h]), np.linalg.eigvalsh(m32[0, h])
        err = np.abs(w32 - w64).max()
        assert err <= bound[h], (err, bound[h])
        assert err <= 1e-3 * bound[h]  # measured: about 6e-6 of the bound, 2e-9 of the largest eigenvalue
        assert err / w64.max() < 1e-5
    np.testing.assert_allclose(mean32, mean64, rtol=1e-6)
    assert (exact.product_bound() == 0).all()


def test_a_group_over_the_memory_budget_is_refused_before_its_first_pass(resources, tmp_path, monkeypatch):
    """A job whose layer group's moments exceed extraction.stream_memory_gb (a plan that did not
    know the model's layers and heads puts every layer in one group) is refused with the number of
    groups that fit, before any forward pass; one layer over the budget asks for a larger one."""
    import eigenattn.spectra.streamed as streamed

    per_layer = moment_layer_bytes(9, [SEQ_LEN // 2])  # smollm2, prefix: 9 heads × 2 × 8 × 14 × 12 B
    common = dict(
        seq_len=SEQ_LEN, layers=[0, 1, 2, 3], group=0, n_groups=1, views=["prefix"], first_index=0, split_sequence=1,
        batch_size=2, device="cpu", autocast="none", attrs={"model": "smollm2"}, progress=False,
    )  # fmt: skip
    passes = []
    monkeypatch.setattr(streamed.MomentCapture, "begin", lambda self, first: passes.append(first))
    args = (resources / "models" / "smollm2", _texts(resources, 2), np.arange(2))
    with pytest.raises(ConfigError, match=r"extraction.layer_groups(.|\n)*use at least 2 layer groups"):
        stream_moments(*args, tmp_path / "a.zarr", stream_memory_gb=2.5 * per_layer / 1e9, **common)
    with pytest.raises(ConfigError, match=r"extraction.stream_memory_gb(.|\n)*one layer of smollm2"):
        stream_moments(*args, tmp_path / "b.zarr", stream_memory_gb=0.5 * per_layer / 1e9, **common)
    assert not passes and not (tmp_path / "a.zarr").exists()
