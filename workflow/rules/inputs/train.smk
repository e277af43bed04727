# The train stage's input, param and target functions (its rules: ../train.smk).


def run_outputs(name):
    return [
        path(getattr(rules.train_run.output, name), **r)
        for r in plan.training_runs(config)
    ]


def tokenizer_input(wildcards):
    if TRAIN["vocab"] == "minilm":
        return {"minilm": path(rules.fetch_model.output[0], model="minilm")}
    return {"documents": corpus_documents()}


def train_inputs(wildcards):
    ins = {
        "tokenizer": rules.train_tokenizer.output[0],
        "windows": rules.train_data.output[0],
    }
    if wildcards.tvariant in settings.USES_MAPS:
        ins["stats"] = path(rules.eigen_rows.output.rows, model=TRAINED, view="all")
    if wildcards.mode == "finetune":
        ins["init"] = trained_model_dir()
    return ins


def training_settings(wildcards):
    return settings.Training.from_config(config, wildcards.tvariant).params()
