from eigenattn.storage import logs
from eigenattn.corpus.passages import check_corpus_capacity, load_documents, sample_passages, word_counts
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
p = snakemake.params.sampling
docs = load_documents({"source": "pypi"}, snakemake.wildcards.corpus, snakemake.input[0])
check_corpus_capacity(snakemake.config, word_counts(docs["text"]), p, snakemake.params.capacity_key)
passages = sample_passages(
    docs,
    seed=p["seed"],
    seq_len=p["seq_len"],
    n_sequences=p["n_sequences"],
    heldout_fraction=p["heldout_fraction"],
    corpus=snakemake.wildcards.corpus,
)
write_table(passages, snakemake.output[0])
log.info("%s", passages.groupby("split").size().to_dict())
