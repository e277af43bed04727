"""Data for MLM training (docs/method.md §8): the WordPiece vocabulary, the token windows, BERT
masking, the held-out batches every run is scored on, and the unigram baseline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from eigenattn.corpus.passages import split_documents
from eigenattn.errors import InputError
from eigenattn.storage.store import atomic_output

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_wordpiece(vocab: dict | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_wordpiece(texts, vocab_size: int, out_dir, seq_len: int):
    """Train a lower-cased WordPiece vocabulary on ``texts`` and save it as a transformers tokenizer.

    The trainer finds the same pieces in every process but numbers them in an order that varies
    between processes (hash-map iteration in the tokenizers library), so the ids are reassigned
    canonically: the special tokens, then every other piece in sorted order. WordPiece splits by
    longest match over the set of pieces, so this changes no tokenisation, only the ids, and makes
    the vocabulary file identical across runs.
    """
    tok = _bert_wordpiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    pieces = SPECIALS + sorted(t for t in tok.get_vocab() if t not in SPECIALS)
    tok = _bert_wordpiece({t: i for i, t in enumerate(pieces)})
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=seq_len,
    )
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.mask_token_id is None or tok.cls_token_id is None or tok.sep_token_id is None:
        raise InputError(
            path,
            "the tokenizer needs [CLS], [SEP] and [MASK] tokens for MLM training",
            "use a BERT-style tokenizer (training.vocab: wordpiece builds one)",
        )
    return tok


def split_texts(documents_path, seed: int, heldout_fraction: float) -> dict[str, list[str]]:
    """The fit and held-out documents, by the same split as the sampled passages."""
    docs = pd.read_parquet(documents_path)
    split = split_documents(docs["n_words"].to_numpy(), seed, heldout_fraction)
    return {s: docs["text"][split == s].tolist() for s in ("fit", "heldout")}


def chunk_documents(tok, texts, seq_len: int, with_documents: bool = False):
    """Every document's tokens cut into consecutive windows of seq_len − 2, framed by [CLS] … [SEP]
    (with ``with_documents``: also each window's document, its index in ``texts``)."""
    body = seq_len - 2
    out = []
    limit, tok.model_max_length = tok.model_max_length, int(1e12)  # whole documents, cut below
    try:
        enc = tok(list(texts), add_special_tokens=False)["input_ids"]
    finally:
        tok.model_max_length = limit
    docs = []
    for d, ids in enumerate(enc):
        for i in range(0, len(ids) - body + 1, body):
            out.append([tok.cls_token_id, *ids[i : i + body], tok.sep_token_id])
            docs.append(d)
    if not out:
        raise InputError(
            "documents",
            f"no document is longer than seq_len − 2 = {body} tokens",
            "use a corpus with longer documents, or a smaller sampling.seq_len",
        )
    windows = np.asarray(out, dtype=np.int64)
    return (windows, np.asarray(docs, dtype=np.int64)) if with_documents else windows


def build_windows(
    tokenizer_dir, documents, seq_len: int, seed: int, heldout_fraction: float, eval_sequences: int, out_path
) -> dict:
    """Tokenise the corpus once for every run: fit windows, and the evenly spread held-out windows.

    Writes an .npz with int32 arrays ``fit`` (N, n), ``heldout`` (M, n) and ``heldout_documents``
    (M,: each held-out window's document, the independent unit of C4's token part), atomically.
    """
    tok = load_tokenizer(tokenizer_dir)
    texts = split_texts(documents, seed, heldout_fraction)
    fit = chunk_documents(tok, texts["fit"], seq_len)
    held, held_docs = chunk_documents(tok, texts["heldout"], seq_len, with_documents=True)
    pick = np.unique(np.linspace(0, len(held) - 1, min(eval_sequences, len(held))).round().astype(int))
    with atomic_output(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            fit=fit.astype(np.int32),
            heldout=held[pick].astype(np.int32),
            heldout_documents=held_docs[pick].astype(np.int32),
        )
    return {
        "fit": len(fit),
        "heldout": len(pick),
        "heldout_available": len(held),
        "heldout_documents": len(np.unique(held_docs[pick])),
    }


def mask_batch(ids: torch.Tensor, tok_info: dict, generator: torch.Generator, p: float = 0.15):
    """BERT masking: p of the non-special tokens; of those 80% [MASK], 10% random, 10% kept.

    Returns (masked input, flat positions of the predicted tokens, their labels).
    """
    special = torch.zeros_like(ids, dtype=torch.bool)
    for t in tok_info["special_ids"]:
        special |= ids == t
    u = torch.rand(ids.shape, generator=generator)
    pick = (u < p) & ~special
    if not bool(pick.any()):  # at least one prediction per batch
        cand = (~special).flatten().nonzero().flatten()
        pick.view(-1)[cand[torch.randint(len(cand), (1,), generator=generator)]] = True
    r = torch.rand(ids.shape, generator=generator)
    rand_tok = torch.randint(0, tok_info["vocab_size"], ids.shape, generator=generator)
    rand_special = torch.isin(rand_tok, torch.tensor(tok_info["special_ids"]))
    x = ids.clone()
    x[pick & (r < 0.8)] = tok_info["mask_id"]
    swap = pick & (r >= 0.8) & (r < 0.9) & ~rand_special  # a random non-special token (else kept)
    x[swap] = rand_tok[swap]
    pos = pick.flatten().nonzero().flatten()
    return x, pos, ids.flatten()[pos]


def shuffle_windows(ids: torch.Tensor, special_ids, seed: int) -> torch.Tensor:
    """The held-out windows with the order of their non-special tokens shuffled (seeded).

    A model scores as well on them as on the originals only if it ignores word order: then it is a
    bag-of-words predictor, and no attention variant can be told apart from exact attention.
    """
    g = torch.Generator().manual_seed(int(seed) * 104729 + 7)
    out = ids.clone()
    special = torch.isin(ids, torch.tensor(list(special_ids)))
    for i in range(len(ids)):
        pos = (~special[i]).nonzero().flatten()
        out[i, pos] = ids[i, pos[torch.randperm(len(pos), generator=g)]]
    return out


def heldout_batches(ids: torch.Tensor, tok_info: dict, seed: int, batch_size: int):
    """(masked input, positions, labels) of every held-out batch, with masks fixed by ``seed``.

    Every run, and the unigram baseline, is scored on exactly these tokens.
    """
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    for i in range(0, len(ids), batch_size):
        yield mask_batch(ids[i : i + batch_size], tok_info, g)


def unigram_baseline(
    fit_ids: torch.Tensor, heldout_ids: torch.Tensor, tok_info: dict, seed: int, batch_size: int
) -> dict:
    """What predicting without context achieves: the fit split's unigram entropy (nats, over
    non-special tokens), its most frequent token, and that token's accuracy on the held-out
    positions every run is scored on."""
    counts = torch.bincount(fit_ids.flatten(), minlength=tok_info["vocab_size"]).double()
    counts[torch.tensor(tok_info["special_ids"])] = 0
    p = counts / counts.sum()
    nz = p[p > 0]
    top = int(counts.argmax())
    hits, total = 0, 0
    for _, _, labels in heldout_batches(heldout_ids, tok_info, seed, batch_size):
        hits += int((labels == top).sum())
        total += len(labels)
    return {
        "unigram_entropy": float(-(nz * nz.log()).sum()),
        "unigram_top_token": top,
        "unigram_acc": hits / total,
        "heldout_tokens": total,
    }
