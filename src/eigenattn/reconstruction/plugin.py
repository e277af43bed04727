"""Plug-in evaluation (docs/method.md §7): every analysed head's scores replaced by their
reconstruction inside the forward pass of the pretrained model, on held-out text.

- Causal LM: perplexity of the tokens predicted from the queries of the view (for the
  ``prefix`` view, the second half of each sequence: the first half is exact by construction),
  and its ratio to the exact model's.
- Encoder: cosine similarity of mean-pooled final hidden states to the exact model's, averaged
  over sequences (the exact value is 1).

The held-out passages are ``plugin.n_sequences`` of the split **spread over documents**
(:func:`heldout_selection`: one passage of every document first, then a second of each, ...), and
every method's per-sequence values are kept with each passage's document
(:func:`eigenattn.reconstruction.intervals.sequences_path`, docs/data-contract.md), so that the
claims resample documents, the independent unit (docs/method.md §9).
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from eigenattn.capture.probe import model_class
from eigenattn.config.settings import Plugin
from eigenattn.errors import InputError
from eigenattn.reconstruction.cost import PEERS, cost_share, family, view_macs
from eigenattn.reconstruction.estimators import check_method, eigenspace_rank
from eigenattn.reconstruction.intervals import spread_over_documents
from eigenattn.reconstruction.partial import attach, attach_peers, detach, maps_from_stats, register
from eigenattn.reconstruction.peer_attention import PeerSpec
from eigenattn.reconstruction.workers import map_in_threads
from eigenattn.spectra.stores import RowStats
from eigenattn.storage.store import open_store

log = logging.getLogger(__name__)

COLUMNS = [
    "model",
    "estimator",
    "strategy",
    "subset_size",
    "metric",
    "value",
    "exact_value",
    "ratio",
    "family",
    "attn_macs",
    "cost_share",
    "n_sequences",
    "n_documents",
]


SEQUENCE_COLUMNS = ["model", "estimator", "strategy", "subset_size", "sequence", "passage_id", "document", "value"]


def heldout_ids(shards, n_sequences: int | None) -> np.ndarray:
    """Token ids (N, n) of the shards, in passage order (the first n_sequences)."""
    ids = []
    for p in shards:
        ids.append(open_store(p)["input_ids"][:])
    ids = np.concatenate(ids)
    return ids[:n_sequences] if n_sequences else ids


@dataclass(frozen=True)
class Selection:
    """Passages chosen for an in-model evaluation: token ids (N, n), passage ids and documents
    (one label per passage; None when the passages table was not given)."""

    ids: np.ndarray
    passage_ids: np.ndarray
    documents: np.ndarray | None

    @property
    def n_documents(self) -> int:
        return len(self.ids) if self.documents is None else len(set(self.documents.tolist()))


def heldout_selection(shards, n_sequences: int | None, passages=None) -> Selection:
    """``n_sequences`` passages of the shards (the split's stores), spread over documents.

    ``passages``: the sampled passages table (parquet path or DataFrame with ``passage_id`` and
    ``doc_id``). With it, the passages are taken one per document first, then a second of each
    document, and so on (:func:`eigenattn.reconstruction.intervals.spread_over_documents`), so that
    ``n_sequences`` rests on as many documents as the split holds; the chosen passages keep their
    passage order. Without it, the first ``n_sequences`` in passage order and no document labels.
    """
    ids, pids = [], []
    for p in shards:
        g = open_store(p)
        ids.append(g["input_ids"][:])
        pids.append(np.asarray(g["passage_id"][:], dtype=np.int64))
    ids, pids = np.concatenate(ids), np.concatenate(pids)
    if passages is None:
        keep = np.arange(min(len(ids), n_sequences or len(ids)))
        return Selection(ids[keep], pids[keep], None)
    table = passages if isinstance(passages, pd.DataFrame) else pd.read_parquet(passages)
    doc_of = dict(zip(table["passage_id"].astype(np.int64), table["doc_id"].astype(str), strict=True))
    missing = sorted(set(pids.tolist()) - set(doc_of))
    if missing:
        raise InputError(
            str(shards[0]),
            f"holds passages {missing[:5]} that the passages table does not list",
            "re-run extraction from the same sampled passages",
        )
    docs = np.array([doc_of[int(i)] for i in pids], dtype=object)
    keep = spread_over_documents(docs, n_sequences)
    return Selection(ids[keep], pids[keep], docs[keep])


def load(model_dir, causal: bool, device):
    impl = register()
    # An encoder checkpoint loads as its own class (T5EncoderModel), as in extraction.
    cls = AutoModelForCausalLM if causal else model_class(AutoConfig.from_pretrained(model_dir), str(model_dir))
    model = cls.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
    return model.eval().to(device)


@torch.inference_mode()
def sequence_outputs(model, ids: torch.Tensor, causal: bool, q0: int, batch_size: int):
    """Causal: each sequence's mean NLL over the targets predicted from queries >= q0 (float64
    array). Encoder: the pooled final states (tensor)."""
    out = []
    for i in range(0, len(ids), batch_size):
        x = ids[i : i + batch_size]
        if causal:
            lp = torch.log_softmax(model(input_ids=x).logits[:, q0:-1].float(), dim=-1)
            out.append((-lp.gather(-1, x[:, q0 + 1 :, None]).squeeze(-1)).double().mean(-1).cpu())
        else:
            out.append(model(input_ids=x).last_hidden_state.float().mean(dim=1).cpu())
    res = torch.cat(out)
    return res.numpy() if causal else res


def plugin_eval(
    model_dir,
    rows_store,
    heldout_shards,
    settings: Plugin,
    *,
    device,
    passages=None,
    progress: bool = True,
    workers: int = 1,
    sequences: list | None = None,
) -> pd.DataFrame:
    """The plug-in table of one model: every method of ``settings`` inside the forward pass of
    ``settings.n_sequences`` held-out passages (spread over documents when ``passages``, the sampled
    passages table, is given: :func:`heldout_selection`), against the exact model.

    ``sequences``: a list that receives the per-sequence table (SEQUENCE_COLUMNS: each sequence's
    mean NLL of the view's targets, or its embedding cosine to exact, with its passage and
    document; the exact model's rows have estimator ``exact``).

    On the CPU, ``workers`` > 1 runs that many methods side by side in threads, each on its own
    copy of the model with one torch thread (:mod:`eigenattn.reconstruction.workers`): a method's
    forward passes are then those of a single-threaded job, whatever ``workers`` is. (Two torch
    threads inside each forward pass do as well on idle cores, but on shared ones their OpenMP
    barriers wait for a descheduled partner: 2.1x the wall time in docs/performance.md.)"""
    estimators, strategies, subset_sizes = settings.estimators, settings.strategies, settings.subset_sizes
    n_sequences, batch_size = settings.n_sequences, settings.batch_size
    ridge, rank, seed = settings.ridge, settings.rank, settings.seed
    stats = RowStats(rows_store)
    for e in estimators:
        for st in strategies:
            for s in subset_sizes:
                check_method(e, st, s, stats.d, ("plugin.estimators", "plugin.strategies", "plugin.subset_sizes"))
    sel = heldout_selection(heldout_shards, n_sequences, passages)
    stats.check_matches(sel.ids.shape[1], f"held-out tokens {heldout_shards[0]}")
    log.info("%d held-out passages from %d documents", len(sel.ids), sel.n_documents)
    device = torch.device(device)
    ids = torch.from_numpy(sel.ids.astype(np.int64)).to(device)
    model = load(model_dir, stats.causal, device)
    n_layers = model.config.num_hidden_layers
    if len(stats.layers) < n_layers:
        log.warning("statistics cover layers %s of %d: the other layers keep exact attention", stats.layers, n_layers)
    q0 = stats.query_range[0]
    t0 = time.perf_counter()
    exact = sequence_outputs(model, ids, stats.causal, q0, batch_size)
    log.info("exact forward of %d sequences: %.1f s", len(ids), time.perf_counter() - t0)
    if stats.causal:
        exact_ppl = float(np.exp(exact.mean()))
        log.info("exact perplexity (targets from queries %d..): %.3f", q0, exact_ppl)
    ps = settings.peer_settings
    nq, d = stats.query_range[1] - stats.query_range[0], stats.d
    d_head = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads

    def peer_specs(method, variant, s):
        kw = {"seq_len": stats.seq_len, "query_range": stats.query_range, "key_range": stats.key_range}
        pinv = variant if method == "nystrom" else None
        return {
            layer: PeerSpec(
                method, s, **kw, causal=stats.causal, q_last=ps.q_last, sinks=ps.sinks, pinv=pinv, key=ps.key
            )
            for layer in stats.layers
        }

    peer_grid = [(m, v, s) for s in subset_sizes for m in ps.methods for v in ps.variants(m)]
    for m, v, s in peer_grid:
        peer_specs(m, v, s)  # refuses a peer that cannot run on this view before any forward pass
    grid = [(e, st, s) for s in subset_sizes for st in strategies for e in estimators] + peer_grid
    workers = max(1, min(int(workers), len(grid))) if device.type == "cpu" else 1
    idle = queue.SimpleQueue()  # a model copy per worker: the methods are attributes of its modules
    for replica in [model, *(copy.deepcopy(model) for _ in range(workers - 1))]:
        idle.put(replica)

    def method_outputs(method):
        est, st, s = method
        replica = idle.get()
        try:
            if est in PEERS:
                attach_peers(replica, peer_specs(est, st, s))
            else:
                maps = maps_from_stats(stats, est, st, s, ridge=ridge, rank=rank, seed=seed)
                attach(replica, {k: v.to(device) for k, v in maps.items()})
            return sequence_outputs(replica, ids, stats.causal, q0, batch_size)
        finally:
            detach(replica)
            idle.put(replica)

    records = []
    docs = sel.documents if sel.documents is not None else np.array([""] * len(ids), dtype=object)

    def per_seq(est, st, s, values):
        return pd.DataFrame(
            {
                "model": stats.model,
                "estimator": est,
                "strategy": st,
                "subset_size": s,
                "sequence": np.arange(len(values)),
                "passage_id": sel.passage_ids,
                "document": docs,
                "value": values,
            }
        )

    seq_tables = [per_seq("exact", "-", 0, exact if stats.causal else np.ones(len(ids)))]
    outputs = zip(grid, map_in_threads(method_outputs, grid, workers))
    for (est, st, s), out in tqdm(outputs, total=len(grid), desc=f"plug-in {stats.model}", disable=not progress):
        if stats.causal:
            per = np.asarray(out, dtype=np.float64)
            value = float(np.exp(per.mean()))
            rec = ("perplexity", value, exact_ppl, value / exact_ppl)
        else:
            per = torch.nn.functional.cosine_similarity(out, exact, dim=-1).double().numpy()
            value = float(per.mean())
            rec = ("embedding_cosine", value, 1.0, value)
        seq_tables.append(per_seq(est, st, s, per))
        k = eigenspace_rank(s, d, rank) if est == "eigenspace" else 0
        kw = {"nq": nq, "d": d, "d_head": int(d_head), "s": s, "k": k, "q_last": min(ps.q_last, nq)}
        records.append(
            {
                "model": stats.model,
                "estimator": est,
                "strategy": st,
                "subset_size": s,
                **dict(zip(COLUMNS[4:8], rec)),
                "family": family(est),
                "attn_macs": view_macs(est, **kw),
                "cost_share": cost_share(est, **kw),
                "n_sequences": len(ids),
                "n_documents": sel.n_documents,
            }
        )
        log.info("%s %s s=%d: %s %.4f (ratio %.4f)", est, st, s, rec[0], rec[1], rec[3])
    if sequences is not None:
        sequences.append(pd.concat(seq_tables, ignore_index=True)[SEQUENCE_COLUMNS])
    return pd.DataFrame.from_records(records, columns=COLUMNS)
