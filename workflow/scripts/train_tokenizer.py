from eigenattn.storage import logs
from eigenattn.storage.store import atomic_store
from eigenattn.training.data import load_tokenizer, split_texts, train_wordpiece

log = logs.start(snakemake)
p = snakemake.params
with atomic_store(snakemake.output[0]) as tmp:
    if p.vocab == "minilm":
        tok = load_tokenizer(snakemake.input.minilm)
        tok.save_pretrained(tmp)
    else:
        texts = split_texts(snakemake.input.documents, p.seed, p.heldout_fraction)["fit"]
        tok = train_wordpiece(texts, p.vocab_size, tmp, p.seq_len)
    log.info("tokenizer: %s, %d tokens", p.vocab, len(tok))
