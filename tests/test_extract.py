"""Captured scores against transformers' own eager `output_attentions` (the oracle)."""

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from transformers import AutoModel, AutoTokenizer

from eigenattn.capture.extract import extract_scores, resolve_layers, shard_passages
from eigenattn.capture.interface import ScoreCapture, capturing, register
from eigenattn.capture.probe import mask_info
from eigenattn.corpus.passages import tokenize_passages
from eigenattn.errors import ConfigError

SEQ_LEN = 24


def _passages(resources, k=5):
    docs = pd.read_parquet(resources / "corpora" / "enwiki-sample" / "documents.parquet")
    words = docs["text"].iloc[3].split()
    return [" ".join(words[i * SEQ_LEN : (i + 1) * SEQ_LEN]) for i in range(k)]


def _oracle_probs(model_dir, ids):
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_attentions=True)
    return model, np.stack([a.numpy() for a in out.attentions], axis=1)  # (N, L, H, n, n)


def _softmax_with_mask(scores, causal):
    s = scores.astype(np.float64)
    if causal:
        n = s.shape[-1]
        s = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, s)
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("name,causal", [("minilm", False), ("smollm2", True)])
def test_stored_scores_match_eager_output_attentions(resources, tmp_path, name, causal):
    model_dir = resources / "models" / name
    texts = _passages(resources)
    ids = tokenize_passages(AutoTokenizer.from_pretrained(model_dir), texts, SEQ_LEN)
    model, ref = _oracle_probs(model_dir, ids)
    errors, probs, scores = {}, {}, {}
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{name}-{dtype}.zarr"
        extract_scores(
            model_dir,
            texts,
            np.arange(len(texts)),
            out,
            seq_len=SEQ_LEN,
            dtype=dtype,
            batch_size=2,
            chunk_sequences=1,
            device="cpu",
            progress=False,
            autocast="none",
            layers="all",
            compression="lz4",
        )
        g = zarr.open_group(out, mode="r")
        assert g.attrs["causal"] is causal
        np.testing.assert_array_equal(g["input_ids"][:], ids)
        probs[dtype] = _softmax_with_mask(g["scores"][:], causal)
        scores[dtype] = g["scores"][:].astype(np.float64)
        errors[dtype] = float(np.abs(probs[dtype] - ref).max())
    # float16 storage rounds each float32 score (the same in both runs: same inputs, same process) to
    # 11 significant bits, |δS| ≤ 2⁻¹¹·|S| (float16's unit roundoff; below its normal range the error
    # is at most 2⁻²⁵, far below the row's Δᵢ). A softmax row then moves by at most a factor
    # e^{±2Δᵢ}, Δᵢ the row's largest |δS| over the keys it sees: |P16 − P32| ≤ P32·(e^{2Δᵢ} − 1)
    # (+1e-12: the float64 softmaxes' own rounding). The old bound, 2e-2, was read off measurements.
    n = scores["float32"].shape[-1]
    seen = ~np.triu(np.ones((n, n), bool), 1) if causal else np.ones((n, n), bool)
    delta = 2.0**-11 * np.where(seen, np.abs(scores["float32"]), 0).max(-1, keepdims=True)
    bound16 = float((probs["float32"] * np.expm1(2 * delta)).max())
    print(
        f"{name}: max |softmax(S+mask) - output_attentions| float32 {errors['float32']:.2e}, "
        f"float16 {errors['float16']:.2e} (bound {bound16 + errors['float32']:.2e})"
    )
    assert errors["float32"] <= 1e-5  # the extraction's own probe tolerance (docs/data-contract.md)
    assert np.all(np.abs(probs["float16"] - probs["float32"]) <= probs["float32"] * np.expm1(2 * delta) + 1e-12)
    assert errors["float16"] <= bound16 + errors["float32"]


def test_capture_does_not_change_model_outputs(minilm_dir):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ids = tok(["attention scores are low dimensional"], return_tensors="pt")["input_ids"]
    eager = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    cap_model = AutoModel.from_pretrained(minilm_dir, attn_implementation=register()).eval()
    with torch.no_grad():
        cap = ScoreCapture(layers=[1, 4])
        with capturing(cap):
            h = cap_model(input_ids=ids).last_hidden_state
        h_ref = eager(input_ids=ids).last_hidden_state
    # SDPA (layers not stored) and the fused scale sum in another order than eager: float32 rounding
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-5)
    assert sorted(cap.scores) == [1, 4]
    assert cap.scores[1].shape == (1, 12, ids.shape[1], ids.shape[1])
    # the mask the layers received, read as the probe reads it: not causal
    assert mask_info(cap.mask, ids.shape[1])[0]["kind"] != "causal"


def test_gqa_heads_are_per_query_head(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(["grouped query attention shares key heads"], return_tensors="pt")["input_ids"]
    model = AutoModel.from_pretrained(smollm2_dir, attn_implementation=register()).eval()
    cap = ScoreCapture(layers=[0])
    with torch.no_grad(), capturing(cap):
        model(input_ids=ids)
    s = cap.scores[0]
    assert s.shape[1] == 9  # 9 query heads, though only 3 key heads
    assert mask_info(cap.mask, ids.shape[1])[0] == {"kind": "causal"}
    # Query heads sharing a key head still differ (they have their own queries).
    assert not torch.allclose(s[:, 0], s[:, 1])


def test_interrupted_extraction_leaves_no_store(minilm_dir, tmp_path, monkeypatch):
    import eigenattn.capture.extract as ex

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "check_batch", boom)  # inside the store, after the first forward pass
    out = tmp_path / "s.zarr"
    with pytest.raises(KeyboardInterrupt):
        extract_scores(
            minilm_dir,
            ["a b c d e f g h i j k l m n o p"] * 2,
            [0, 1],
            out,
            seq_len=8,
            dtype="float16",
            batch_size=1,
            chunk_sequences=1,
            device="cpu",
            progress=False,
            autocast="none",
            layers="all",
            compression="lz4",
        )
    assert list(tmp_path.iterdir()) == []


def test_resolve_layers_errors():
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers([2, 0, 2], 3) == [0, 2]
    with pytest.raises(ConfigError, match=r"'models.<name>.layers': layer\(s\) \[5\] out of range"):
        resolve_layers([5], 3)
    with pytest.raises(ConfigError, match=r"'models.minilm.layers': layer\(s\) \[5\] out of range"):
        resolve_layers([5], 3, "models.minilm.layers")
    # the scaling study's thinning: at most k layers, evenly spread, first and last included
    assert resolve_layers({"of": "all", "at_most": 6}, 30) == [0, 6, 12, 17, 23, 29]
    assert resolve_layers({"of": "all", "at_most": 6}, 6) == [0, 1, 2, 3, 4, 5]
    assert resolve_layers({"of": [0, 1, 15, 29], "at_most": 2}, 30) == [0, 29]
    with pytest.raises(ConfigError, match=r"'models.big.layers': layer\(s\) \[40\] out of range"):
        resolve_layers({"of": [40], "at_most": 2}, 30, "models.big.layers")


def test_shards_partition_the_split(tmp_path):
    df = pd.DataFrame({"passage_id": range(10), "split": ["fit"] * 7 + ["heldout"] * 3, "text": ["x"] * 10})
    p = tmp_path / "p.parquet"
    df.to_parquet(p)
    got = np.concatenate([shard_passages(p, "fit", i, 3)["passage_id"].to_numpy() for i in range(3)])
    np.testing.assert_array_equal(got, np.arange(7))
    with pytest.raises(ConfigError, match="'extraction.shards': shard 0 of 4 has no heldout passages"):
        shard_passages(p, "heldout", 0, 4)


def test_stale_check_follows_the_requested_dtype():
    """dtype auto resolves per model, so later stages check what was asked for; an explicit dtype,
    what the store holds."""
    from eigenattn.config.settings import expected_scores

    config = {"sampling": {"seq_len": 16}, "seed": 0, "extraction": {"dtype": "auto"}}
    want = expected_scores(config, "m", "fit")
    assert want["dtype_requested"] == "auto" and "dtype" not in want
    config["extraction"]["dtype"] = "float16"
    want = expected_scores(config, "m", "fit")
    assert want["dtype"] == "float16" and "dtype_requested" not in want
