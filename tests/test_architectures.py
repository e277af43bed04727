"""Any Hugging Face model: correct scores, or a clear refusal before any score is written.

Tiny random-weight models of many families (tests/tiny_models.py) go through ``extract_scores``.
A supported family's store must reproduce the model's own eager ``output_attentions`` from the
docs/models.md formula, ``softmax([S + mask, sink])`` per layer, within 1e-5 in float32; a refused one
must raise UnsupportedModelError naming the model, its model_type, the cause and the fix, and
leave nothing on disk. The oracle here is computed independently of eigenattn.capture.probe.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import zarr

from eigenattn.capture.extract import extract_scores
from eigenattn.capture.interface import (
    CAPTURE_IMPL,
    ScoreCapture,
    capture_attention_forward,
    capturing,
    check_kwargs,
    register,
)
from eigenattn.capture.probe import STORE_DTYPES, STORED_PROB_TOL
from eigenattn.config.schema import enum, node
from eigenattn.errors import ConfigError, UnsupportedModelError
from tiny_models import FAMILIES, build, build_wide_t5, eager_attentions, store_probabilities, texts

SEQ_LEN = 16
TOL = 1e-5
ERRORS: dict[str, float] = {}

# Per-layer masks the families must record at SEQ_LEN (window and chunk 4 < 16).
EXPECTED_MASKS = {
    "bert": [{"kind": "bidirectional"}] * 2,
    "modernbert": [{"kind": "bidirectional"}, {"kind": "bidirectional_sliding_window", "window": 4}],
    "llama": [{"kind": "causal"}] * 2,
    "mistral": [{"kind": "sliding_window", "window": 4}] * 2,
    "gemma2": [{"kind": "sliding_window", "window": 4}, {"kind": "causal"}],
    "gpt_oss": [{"kind": "sliding_window", "window": 4}, {"kind": "causal"}],
    "llama4": [{"kind": "chunked", "chunk": 4}, {"kind": "causal"}],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return lambda name: build(name, root / name) if not (root / name).exists() else root / name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_passes_the_oracle_or_is_refused(name, models, tmp_path):
    what, _, refusal = FAMILIES[name]
    model_dir = models(name)
    out = tmp_path / "scores" / name / "fit" / "shard-0.zarr"
    run = dict(
        seq_len=SEQ_LEN,
        dtype="float32",
        batch_size=2,
        chunk_sequences=1,
        device="cpu",
        progress=False,
        autocast="none",
        layers="all",
        compression="lz4",
        attrs={"model": name},
    )
    if refusal:
        with pytest.raises(UnsupportedModelError) as err:
            extract_scores(model_dir, texts(3), np.arange(3), out, **run)
        msg = str(err.value)
        print(f"{name} ({what}): refused: {msg.splitlines()[0]}")
        assert re.search(refusal, msg, re.S), msg
        assert f"model '{name}' at {model_dir}" in msg and "model_type '" in msg and "\n  fix: " in msg
        assert not (tmp_path / "scores").exists()  # no store, no .partial-* leftover
        return
    extract_scores(model_dir, texts(3), np.arange(3), out, **run)
    g = zarr.open_group(out, mode="r")
    a = g.attrs.asdict()
    S = g["scores"][:]
    assert 5 <= np.abs(S).max() <= 100, "scores should be of order 10 (Q and K are scaled in tiny_models)"
    ref = eager_attentions(model_dir, g["input_ids"][:], a["layers"])
    err = float(np.abs(store_probabilities(out) - ref).max())
    ERRORS[name] = err
    print(
        f"{name} ({what}): max |softmax([S + mask, sink]) - eager output_attentions| = {err:.2e}; "
        f"masks {a['layer_masks']}"
    )
    assert err <= TOL
    probe = a["equivalence_probe"]
    assert probe["max_prob_error"] <= TOL
    assert probe["max_prob_error_stored"] <= TOL and probe["stored_prob_tolerance"] == STORED_PROB_TOL
    # scores of order 10: float16 would reproduce P too, so dtype auto stores float16 for every family
    print(f"{name}: float16 would reproduce P to {probe['stored_prob_errors']['float16']:.2e}")
    assert probe["stored_prob_errors"]["float16"] <= STORED_PROB_TOL
    if name in EXPECTED_MASKS:
        assert a["layer_masks"] == EXPECTED_MASKS[name]
    assert a["causal"] is all(m["kind"] in ("causal", "sliding_window", "chunked") for m in a["layer_masks"])
    mods = a["layer_modifiers"]
    assert any(m["softcap"] == 20.0 for m in mods) is (name == "gemma2")
    assert all(m["position_bias"] for m in mods) is (name == "t5_encoder")
    assert ("sinks" in g) is (name == "gpt_oss")
    if name == "gpt_oss":
        assert g["sinks"].shape == (2, 4) and list(g["sinks"].metadata.dimension_names) == ["layer", "head"]


def _wrong(drop: str):
    """A capture backend that forgets one thing the model asks for."""

    def backend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if drop == "scale":
            scaling = 1.0
        else:
            kwargs.pop(drop, None)
        return capture_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    return backend


@pytest.mark.parametrize(
    "name,drop",
    [
        ("llama", "scale"),
        ("bert", "scale"),
        ("gemma2", "softcap"),
        ("gpt_oss", "s_aux"),
        ("t5_encoder", "position_bias"),
    ],
)
def test_probe_refuses_a_wrong_backend(name, drop, models, tmp_path, monkeypatch):
    from transformers import AttentionInterface

    register()
    monkeypatch.setitem(AttentionInterface._global_mapping, CAPTURE_IMPL, _wrong(drop))
    out = tmp_path / "s" / "shard-0.zarr"
    with pytest.raises(UnsupportedModelError, match="does not reproduce its eager attention") as err:
        extract_scores(
            models(name),
            texts(2),
            np.arange(2),
            out,
            seq_len=SEQ_LEN,
            dtype="float32",
            batch_size=2,
            chunk_sequences=2,
            device="cpu",
            progress=False,
            attrs={"model": name},
            autocast="none",
            layers="all",
            compression="lz4",
        )
    print(f"{name} without {drop}: {str(err.value).splitlines()[0]}")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def wide_t5(tmp_path_factory):
    return build_wide_t5(tmp_path_factory.mktemp("tiny-models") / "t5_wide")


def _extract(model_dir, out, dtype, name):
    extract_scores(
        model_dir,
        texts(3),
        np.arange(3),
        out,
        seq_len=SEQ_LEN,
        dtype=dtype,
        batch_size=2,
        chunk_sequences=1,
        device="cpu",
        progress=False,
        autocast="none",
        layers="all",
        compression="none",
        attrs={"model": name},
    )
    return zarr.open_group(out, mode="r")


def test_auto_dtype_stores_float32_where_float16_fails(wide_t5, tmp_path, caplog):
    """A T5 encoder with |S| ~ 200 (unscaled logits, large position bias): float16 scores move P by
    ~1e-2, so the default dtype (auto) stores float32, says why, and the store reproduces P."""
    assert node("extraction.dtype")["default"] == "auto"
    out = tmp_path / "t5" / "shard-0.zarr"
    with caplog.at_level("INFO", logger="eigenattn.capture.probe"):
        g = _extract(wide_t5, out, node("extraction.dtype")["default"], "t5_wide")
    a = g.attrs.asdict()
    probe = a["equivalence_probe"]
    assert 150 <= np.abs(g["scores"][:]).max() <= 400
    assert a["dtype"] == "float32" and g["scores"].dtype == np.float32 and a["dtype_requested"] == "auto"
    e16 = probe["stored_prob_errors"]["float16"]
    assert e16 > 1.5 * STORED_PROB_TOL  # measured ~1e-2
    assert probe["max_prob_error_stored"] == probe["stored_prob_errors"]["float32"] <= TOL
    err = float(np.abs(store_probabilities(out) - eager_attentions(wide_t5, g["input_ids"][:], a["layers"])).max())
    print(
        f"wide-logit T5: float16 would reproduce P to {e16:.2e}; stored float32 {err:.2e} "
        f"(probe: {probe['max_prob_error_stored']:.2e})"
    )
    assert err <= TOL
    line = next(r.getMessage() for r in caplog.records if "extraction.dtype auto" in r.getMessage())
    assert "float32" in line and f"{e16:.2e}" in line and f"{STORED_PROB_TOL:.0e}" in line


def test_explicit_float16_is_refused_where_it_fails(wide_t5, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"'extraction\.dtype'.*float16.*\d\.\d\de-0\d, over the tolerance "
        r"5e-03",
    ) as err:
        _extract(wide_t5, tmp_path / "t5" / "shard-0.zarr", "float16", "t5_wide")
    assert err.value.key == "extraction.dtype" and "fix: use dtype: auto" in str(err.value)
    print(str(err.value))
    assert not (tmp_path / "t5").exists()  # refused before any score was written


def test_store_dtypes_are_the_schema_enum():
    assert ("auto", *STORE_DTYPES) == enum("extraction.dtype")


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_auto_dtype_keeps_float16_for_ordinary_models(name, models, tmp_path):
    out = tmp_path / name / "shard-0.zarr"
    g = _extract(models(name), out, "auto", name)
    a = g.attrs.asdict()
    probe = a["equivalence_probe"]
    assert a["dtype"] == "float16" and g["scores"].dtype == np.float16 and a["dtype_requested"] == "auto"
    assert probe["max_prob_error_stored"] == probe["stored_prob_errors"]["float16"] <= STORED_PROB_TOL
    err = float(np.abs(store_probabilities(out) - eager_attentions(models(name), g["input_ids"][:], a["layers"])).max())
    print(f"{name}: float16 stored error {err:.2e} (probe {probe['max_prob_error_stored']:.2e})")
    assert err <= STORED_PROB_TOL


def test_unknown_keyword_is_refused_by_name(models, tmp_path, monkeypatch):
    from transformers import AttentionInterface

    def extra_arg(module, query, key, value, attention_mask, **kwargs):
        bias = torch.zeros(1, query.shape[1], query.shape[2], key.shape[2])
        return capture_attention_forward(module, query, key, value, attention_mask, alibi_slopes=bias, **kwargs)

    register()
    monkeypatch.setitem(AttentionInterface._global_mapping, CAPTURE_IMPL, extra_arg)
    with pytest.raises(
        UnsupportedModelError,
        match=r"LlamaAttention passes alibi_slopes=Tensor .* does not "
        r"implement",
    ) as err:
        extract_scores(
            models("llama"),
            texts(2),
            np.arange(2),
            tmp_path / "s.zarr",
            seq_len=SEQ_LEN,
            device="cpu",
            progress=False,
            attrs={"model": "llama"},
            dtype="float16",
            batch_size=8,
            chunk_sequences=4,
            autocast="none",
            layers="all",
            compression="lz4",
        )
    assert "model_type 'llama'" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_none_keywords_are_allowed_and_unknown_ones_named():
    mod = torch.nn.Linear(1, 1)
    check_kwargs(mod, {"encoder_hidden_states": None, "position_ids": torch.zeros(1)}, {"position_ids"}, "x")
    with pytest.raises(UnsupportedModelError, match="passes indices=Tensor"):
        check_kwargs(mod, {"indices": torch.zeros(1)}, set(), "x")


def test_shared_layer_index_never_overwrites(models):
    """Encoder–decoder self- and cross-attention share a layer_idx: the capture raises instead of overwriting."""
    from transformers import BartModel

    model = BartModel.from_pretrained(models("bart"), attn_implementation=register()).eval()
    ids = torch.randint(4, 70, (1, 8))
    with torch.no_grad(), capturing(ScoreCapture()), pytest.raises(UnsupportedModelError, match="share layer index 0"):
        model(input_ids=ids, decoder_input_ids=ids)


def test_shared_module_without_layer_idx_is_keyed_by_call_order(models):
    """ALBERT runs one attention module for every layer: each call is its own layer."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(models("albert"), attn_implementation=register()).eval()
    cap = ScoreCapture()
    with torch.no_grad(), capturing(cap):
        model(input_ids=torch.randint(4, 70, (1, 8)))
    assert sorted(cap.scores) == [0, 1] and not torch.equal(cap.scores[0], cap.scores[1])


def test_matrix_summary():
    """Runs last: the maximum oracle error of every family that passed (see docs/models.md)."""
    if not ERRORS:
        pytest.skip("run with the family tests")
    for name, err in sorted(ERRORS.items()):
        print(f"{name:12s} {err:.2e}")
    assert max(ERRORS.values()) <= TOL


@pytest.mark.parametrize(
    "name,arg", [("gemma2", "softcap=float"), ("gpt_oss", "s_aux=Parameter"), ("t5_encoder", "position_bias=Tensor")]
)
def test_partial_backend_refuses_what_it_does_not_implement(name, arg, models):
    """The plug-in (partial) backend would drop these modifiers: it refuses them by name instead."""
    from eigenattn.reconstruction.plugin import load

    model = load(models(name), causal=False, device="cpu")
    if name == "t5_encoder":
        assert type(model).__name__ == "T5EncoderModel"  # loaded as its own class, as in extraction
    with torch.no_grad(), pytest.raises(UnsupportedModelError, match=f"passes {arg}.*'partial' backend"):
        model(input_ids=torch.randint(4, 70, (1, 8)))
