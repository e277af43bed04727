# Stage 6: training runs with approximate attention, and their summary.


include: "inputs/train.smk"


rule train_tokenizer:
    """The encoder's tokenizer: minilm's, or a WordPiece trained on the fit documents."""
    input:
        unpack(tokenizer_input),
    output:
        directory("results/training/tokenizer"),
    log:
        "logs/train_tokenizer.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        vocab=TRAIN["vocab"],
        vocab_size=TRAIN["vocab_size"],
        seq_len=SEQ_LEN,
        seed=config["seed"],
        heldout_fraction=config["sampling"]["heldout_fraction"],
    script:
        "../scripts/train_tokenizer.py"


rule train_data:
    """Tokenize the corpus once into the fit and held-out windows of every run."""
    input:
        tokenizer=rules.train_tokenizer.output[0],
        documents=corpus_documents(),
    output:
        "results/training/data/windows.npz",
    log:
        "logs/train_data.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        seq_len=SEQ_LEN,
        seed=config["seed"],
        heldout_fraction=config["sampling"]["heldout_fraction"],
        eval_sequences=TRAIN["eval_sequences"],
    script:
        "../scripts/train_data.py"


rule train_run:
    """Train or fine-tune the encoder with one attention variant, subset size and seed."""
    input:
        unpack(train_inputs),
    output:
        metrics="results/training/{mode}/{tvariant}/s{s}/seed{seed}/metrics.csv",
        final="results/training/{mode}/{tvariant}/s{s}/seed{seed}/final.json",
        tokens="results/training/{mode}/{tvariant}/s{s}/seed{seed}/heldout_tokens.npz",
        model=directory("results/training/{mode}/{tvariant}/s{s}/seed{seed}/model"),
    log:
        "logs/train/{mode}/{tvariant}/s{s}/seed{seed}.log",
    benchmark:
        "benchmarks/out/train/{mode}/{tvariant}/s{s}/seed{seed}.tsv"
    conda:
        "../../envs/eigenattn.yaml"
    threads: 1
    resources:
        gpu=gpus_for("training"),
    params:
        settings=training_settings,
        runtime=runtime("training"),
    script:
        "../scripts/train_run.py"


rule train_summary:
    """One table of every training run's final metrics."""
    input:
        final=run_outputs("final"),
        tokens=run_outputs("tokens"),
    output:
        summary="results/training/summary.csv",
        comparisons="results/training/comparisons.csv",
    log:
        "logs/train_summary.log",
    conda:
        "../../envs/eigenattn.yaml"
    params:
        keep=config["claims"]["c4_min_kept_gain"],
    script:
        "../scripts/train_summary.py"


rule train:
    """Stage 6: every training run and their summary."""
    input:
        rules.train_summary.output.comparisons,
