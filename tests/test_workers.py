"""Layers of the held-out evaluation and methods of the plug-in run side by side in threads and
give the same table, row order included, as one after the other."""

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from eigenattn.config.settings import Plugin, Reconstruction
from eigenattn.reconstruction.estimators import ESTIMATORS
from eigenattn.reconstruction.evaluate import evaluate_view
from eigenattn.reconstruction.plugin import plugin_eval
from eigenattn.reconstruction.workers import map_in_threads
from eigenattn.spectra.stores import run_rows
from synthetic import low_rank_scores, write_store

L, H, n = 3, 2, 16  # layers, heads and tokens of the synthetic stores and the tiny causal model
PEERS = {"peers": ("nystrom", "topk_oracle", "vertical_slash", "sink_window"), "q_last": 2, "sinks": 1}


@pytest.fixture(scope="module")
def causal_stores(tmp_path_factory):
    """Fit and held-out score stores of a causal model, its prefix rows.zarr, and held-out token ids."""
    root = tmp_path_factory.mktemp("workers")
    data = low_rank_scores(20, L, H, n, seed=2)
    fit = write_store(root / "fit.zarr", data[:12], causal=True, model="tiny")
    held = write_store(root / "held.zarr", data[12:], causal=True, model="tiny")
    zarr.open_group(held, mode="a").create_array(
        "input_ids", data=np.random.default_rng(0).integers(4, 120, size=(8, n), dtype=np.int64)
    )
    run_rows([fit], root / "rows.zarr", "prefix", ("raw",), 2)
    return {"fit": fit, "held": held, "rows": str(root / "rows.zarr"), "root": root}


def test_map_in_threads_keeps_order_and_restores_thread_counts():
    before = torch.get_num_threads()
    assert list(map_in_threads(lambda i: (i, torch.get_num_threads()), range(5), 2)) == [(i, 1) for i in range(5)]
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        list(map_in_threads(lambda i: 1 // i, range(3), 2))
    assert torch.get_num_threads() == before


def test_layers_in_threads_give_the_same_table(causal_stores):
    settings = Reconstruction(
        estimators=ESTIMATORS,
        strategies=("strided", "random", "pivoted_qr"),
        subset_sizes=(2, 4),
        ridge=1e-6,
        rank=0.5,
        seed=0,
        eval_rows=40,
        transfer=("adjacent_layer", "farthest_layer"),
        transfer_estimators=("conditional_gaussian",),
        pinv=("exact", "iterative"),
        **PEERS,
    )
    args = (causal_stores["rows"], [causal_stores["held"]], settings)
    kw = {"fit_shards": [causal_stores["fit"]], "progress": False}
    one = evaluate_view(*args, **kw)
    two = evaluate_view(*args, **kw, workers=2)
    assert len(one) and one.layer.is_monotonic_increasing and set(one.estimator) >= set(PEERS["peers"])
    pd.testing.assert_frame_equal(one, two, check_exact=True)


def test_methods_in_threads_give_the_same_plugin_table(causal_stores):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model_dir = causal_stores["root"] / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    settings = Plugin(
        estimators=ESTIMATORS,
        strategies=("pivoted_qr",),
        subset_sizes=(2, 4),
        n_sequences=6,
        batch_size=4,
        ridge=1e-6,
        rank=0.5,
        seed=0,
        pinv=("exact",),
        **PEERS,
    )
    args = (model_dir, causal_stores["rows"], [causal_stores["held"]], settings)
    one = plugin_eval(*args, device="cpu", progress=False)
    two = plugin_eval(*args, device="cpu", progress=False, workers=2)
    assert len(one) == 2 * (len(ESTIMATORS) + len(PEERS["peers"])) and (one.metric == "perplexity").all()
    pd.testing.assert_frame_equal(one, two, check_exact=True)
