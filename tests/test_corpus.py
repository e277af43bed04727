"""Corpus parsing, document split and deterministic sampling."""

import bz2
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from eigenattn.config.settings import Sampling
from eigenattn.corpus.passages import (
    check_corpus_capacity,
    parse_mediawiki_dump,
    sample_passages,
    split_documents,
    strip_wikitext,
    tokenize_passages,
)
from eigenattn.errors import ConfigError, InputError

DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Alpha</title><ns>0</ns><id>1</id><revision><text>'''Alpha''' is a [[Greek alphabet|letter]].
{{Infobox letter|name=Alpha}} It has a [[File:Alpha.svg|thumb|caption text]] value.<ref>cite</ref>
[[Category:Letters]]</text></revision></page>
<page><title>Talk:Alpha</title><ns>1</ns><id>2</id><revision><text>talk page</text></revision></page>
<page><title>Alfa</title><ns>0</ns><id>3</id><redirect title="Alpha"/><revision><text>#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Beta</title><ns>0</ns><id>4</id><revision><text>== History ==
Beta follows ''alpha''.</text></revision></page>
</mediawiki>"""


def test_parse_mediawiki_keeps_articles_and_strips_markup(tmp_path):
    p = tmp_path / "dump.xml.bz2"
    p.write_bytes(bz2.compress(DUMP.encode()))
    docs = parse_mediawiki_dump(p)
    assert docs["title"].tolist() == ["Alpha", "Beta"]  # talk page and redirect dropped
    alpha = docs["text"].iloc[0]
    assert alpha.startswith("Alpha is a letter.")
    for junk in ("[[", "]]", "{{", "'''", "Infobox", "thumb", "Category", "cite", "<ref"):
        assert junk not in alpha
    assert docs["n_words"].iloc[1] == len(docs["text"].iloc[1].split())


def test_strip_wikitext_plain():
    assert strip_wikitext("a [[b|c]] ''d''") == "a c d"


def test_fetched_corpus_is_real_english(resources):
    docs = pd.read_parquet(resources / "corpora" / "enwiki-sample" / "documents.parquet")
    assert len(docs) > 100 and docs["n_words"].sum() > 400_000
    assert "Anarchism" in docs["title"].tolist()
    assert "[[" not in " ".join(docs["text"].head(20))


def test_parquet_documents_are_read_without_datasets(tmp_path):
    """The documents parquet (what sample_passages reads) and parquet `files` corpora are read with
    pandas: `datasets`, ~2 s to import, is not loaded; text_field, id_field and a missing title
    are handled as for the other file types."""
    path = tmp_path / "a.parquet"
    pd.DataFrame({"body": ["a b c", "d e"], "key": [7, 8]}).to_parquet(path)
    docs = pd.DataFrame({"doc_id": ["x", "y"], "title": ["X", "Y"], "text": ["a b", "c"], "n_words": [2, 1]})
    docs.to_parquet(tmp_path / "documents.parquet")
    code = f"""if True:
        import sys
        from eigenattn.corpus.passages import load_documents
        d = load_documents({{"source": "files", "paths": [{str(path)!r}], "text_field": "body", "id_field": "key"}}, "m")
        assert list(d.columns) == ["doc_id", "title", "text"], d.columns
        assert list(d.doc_id) == ["7", "8"] and list(d.text) == ["a b c", "d e"] and list(d.title) == ["", ""]
        d = load_documents({{"source": "pypi"}}, "m", {str(tmp_path / "documents.parquet")!r})
        assert d.to_dict("list") == {{"doc_id": ["x", "y"], "title": ["X", "Y"], "text": ["a b", "c"]}}
        assert "datasets" not in sys.modules, "datasets was imported"
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _docs(sizes):
    return pd.DataFrame(
        {
            "doc_id": [str(i) for i in range(len(sizes))],
            "title": [f"t{i}" for i in range(len(sizes))],
            "text": [" ".join(f"w{i}_{j}" for j in range(n)) for i, n in enumerate(sizes)],
        }
    )


def test_split_is_by_document_and_deterministic():
    n_words = np.array([100, 300, 50, 800, 120, 60, 400])
    a = split_documents(n_words, 7, 0.25)
    b = split_documents(n_words, 7, 0.25)
    assert (a == b).all()
    held = n_words[a == "heldout"].sum() / n_words.sum()
    assert held >= 0.25 and (a == "fit").any()
    assert any((split_documents(n_words, s, 0.25) != a).any() for s in range(8, 20))


def test_sampling_is_deterministic_and_disjoint():
    docs = _docs([400, 900, 300, 1200, 500, 700, 350, 800])
    kw = dict(corpus="toy", seq_len=50, n_sequences={"fit": 20, "heldout": 5}, heldout_fraction=0.2, key="sampling")
    p1 = sample_passages(docs, Sampling(seed=3, **kw))
    p2 = sample_passages(docs, Sampling(seed=3, **kw))
    pd.testing.assert_frame_equal(p1, p2)
    p3 = sample_passages(docs, Sampling(seed=4, **kw))
    assert not p1["text"].equals(p3["text"])
    fit_docs = set(p1.loc[p1.split == "fit", "doc_id"])
    held_docs = set(p1.loc[p1.split == "heldout", "doc_id"])
    assert fit_docs and held_docs and not fit_docs & held_docs
    assert (p1.groupby("split").size() == pd.Series({"fit": 20, "heldout": 5})).all()
    assert p1["passage_id"].tolist() == list(range(25))
    assert all(len(t.split()) == 50 for t in p1["text"])
    # non-overlapping windows: (doc, start) pairs are unique and aligned
    assert not p1.duplicated(["doc_id", "start_word"]).any() and (p1["start_word"] % 50 == 0).all()


def test_too_small_corpus_names_the_key():
    config = {
        "seed": 0,
        "corpus": "toy",
        "sampling": {"heldout_fraction": 0.3, "seq_len": 50, "n_sequences": {"fit": 50, "heldout": 1}},
    }
    sampling = Sampling.from_config(config)
    with pytest.raises(ConfigError, match=r"sampling.n_sequences.fit.*offers only"):
        check_corpus_capacity(sampling, np.array([100, 100, 100]))
    with pytest.raises(ConfigError, match=r"'sampling.n_sequences': corpus 'toy' cannot supply"):
        sample_passages(pd.DataFrame({"doc_id": ["a", "b", "c"], "title": "t", "text": ["w " * 100] * 3}), sampling)


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_tokenize_exact_length_and_repeatable(resources, name):
    tok = AutoTokenizer.from_pretrained(resources / "models" / name)
    docs = pd.read_parquet(resources / "corpora" / "enwiki-sample" / "documents.parquet")
    passages = sample_passages(
        docs,
        Sampling(
            corpus="enwiki-sample",
            seed=0,
            seq_len=64,
            n_sequences={"fit": 6, "heldout": 3},
            heldout_fraction=0.2,
            key="sampling",
        ),
    )
    a = tokenize_passages(tok, passages["text"].tolist(), 64)
    b = tokenize_passages(tok, passages["text"].tolist(), 64)
    assert a.shape == (9, 64) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    if name == "minilm":
        assert (a[:, 0] == tok.cls_token_id).all() and (a[:, -1] == tok.sep_token_id).all()
    with pytest.raises(InputError, match="fewer than seq_len"):
        tokenize_passages(tok, ["too short"], 64)
