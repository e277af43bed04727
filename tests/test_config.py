"""Bad configs fail before any job runs (or, for what needs data, in the rule that has it), name the
key and the fix, and leave nothing under results/."""

import pytest
import yaml

from conftest import REPO, snakemake
from eigenattn.config import plan, validation
from eigenattn.config.validation import check, validate
from eigenattn.errors import ConfigError


def _config():
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c.update({k: v for k, v in yaml.safe_load((REPO / "tests" / "config.yaml").read_text()).items() if k != "models"})
    return c


def _run_bad(workdir, override: dict, *targets):
    cfg = workdir / "bad.yaml"
    cfg.write_text(yaml.safe_dump(override))
    proc = snakemake(workdir, "-c1", *targets, configs=[str(REPO / "config.yaml"), str(cfg)], check=False)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def _assert_nothing_written(workdir):
    results = workdir / "results"
    assert not results.exists() or not [p for p in results.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"run_models": ["minilm", "nosuchmodel"]}, "run_models[1]': unknown model 'nosuchmodel'"),
        ({"sampling": {"seq_len": 1024}}, "sampling.seq_len': 1024 exceeds the 512 positions of model 'minilm'"),
        ({"sampling": {"seq_lne": 64}}, "unknown key 'sampling.seq_lne' (misspelt?)"),
        ({"extraction": {"dtype": "float8"}}, "extraction.dtype'"),
        (
            {
                "models": {"hubmodel": {"source": "hub", "repo_id": "org/x", "revision": "main"}},
                "run_models": ["hubmodel"],
            },
            "models.hubmodel.causal': is not set",
        ),
        (
            {"eigen": {"views": ["all", "prefix"]}},
            "eigen.views': view 'all' is undefined for the causal model 'smollm2'",
        ),
        ({"eigen": {"variants": ["centred"]}}, "eigen.variants[0]'"),
        ({"eigen": {"scheduler": "mpi"}}, "eigen.scheduler'"),
        (
            {"reconstruction": {"subset_sizes": [4, 100]}},
            "reconstruction.subset_sizes': s = [100] exceeds the d = 64 keys of view 'prefix'",
        ),
        ({"reconstruction": {"estimators": ["pca"]}}, "reconstruction.estimators[0]'"),
        ({"plugin": {"strategies": ["greedy"]}}, "plugin.strategies[0]'"),
        ({"plugin": {"n_sequences": 500}}, "plugin.n_sequences': 500 exceeds the 32 held-out passages"),
        ({"eigen": {"variants": ["row_centered"]}}, "eigen.variants': reconstruction fits on the 'raw' row spectra"),
        ({"run_models": ["minilm", "minilm"]}, "run_models': ['minilm', 'minilm'] has non-unique elements"),
    ],
)
def test_bad_config_fails_before_any_job(workdir, override, needle):
    out = _run_bad(workdir, override)
    assert needle in out, out[-3000:]
    assert "fix:" in out
    assert "jobid" not in out  # no job was scheduled
    _assert_nothing_written(workdir)


@pytest.mark.parametrize(
    "override,target,needle",
    [
        (
            {"sampling": {"n_sequences": {"fit": 100000}}},
            "corpus",
            "sampling.n_sequences.fit': corpus 'enwiki-sample' offers only",
        ),
        (
            {
                "models": {"hubmodel": {"source": "hub", "repo_id": "org/x", "revision": "main", "causal": False}},
                "run_models": ["hubmodel"],
                "reconstruction": {"transfer": ["adjacent_layer"]},
                "scaling": {"models": []},
            },
            "resources/models/hubmodel",
            "models.hubmodel.source is 'hub', but the Hugging",
        ),
    ],
)
def test_config_errors_that_need_data_fail_in_their_rule(workdir, monkeypatch, override, target, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # 100,000 fit passages would also need 1.1 TB of score stores, refused at parse time; a large
    # disk (stubbed) lets the rule that has the data give its own error
    monkeypatch.setenv("EIGENATTN_DISK_FREE_GB", "100000")
    out = _run_bad(workdir, override, target)
    log = "".join(p.read_text() for p in (workdir / "logs").rglob("*.log"))
    assert needle in out + log, (out + log)[-3000:]
    assert "fix:" in out + log
    _assert_nothing_written(workdir)


def test_wrong_sha256_names_key_and_leaves_nothing(tmp_path, resources):
    # Own working directory (no cached models), but reuse the downloaded wheels.
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "wheels").symlink_to(resources / "wheels", target_is_directory=True)
    bad = {
        "models": {"minilm": {"sha256": {"config.json": "0" * 64}}},
        "run_models": ["minilm"],
        "reconstruction": {"transfer": ["adjacent_layer"]},
        "scaling": {"models": []},
    }
    out = _run_bad(tmp_path, bad, "resources/models/minilm")
    assert "models.minilm.sha256['config.json']: checksum mismatch" in out, out[-3000:]
    models = tmp_path / "resources" / "models"
    assert not models.exists() or list(models.iterdir()) == []
    _assert_nothing_written(tmp_path)


def test_schema_fills_defaults_and_rejects_types():
    c = {"models": _config()["models"], "corpora": _config()["corpora"]}
    validate(c)
    assert c["sampling"]["n_sequences"] == {"fit": 384, "heldout": 32}
    assert c["extraction"]["device"] == "auto" and c["training"]["finetune_steps"] == 200
    c["sampling"]["seq_len"] = "long"
    with pytest.raises(ConfigError, match="sampling.seq_len"):
        validate(c)


def test_pypi_model_requires_checksums():
    c = _config()
    del c["models"]["minilm"]["sha256"]
    with pytest.raises(ConfigError, match="models.minilm.*sha256"):
        validate(c)


def test_shards_larger_than_split():
    c = validate(_config())
    c["extraction"]["shards"] = 7
    with pytest.raises(ConfigError, match="extraction.shards"):
        check(c)


def test_planning_is_a_function_of_the_config():
    c = validate(_config())
    assert plan.model_views(c, "minilm") == ["all", "prefix"] and plan.model_views(c, "smollm2") == ["prefix"]
    assert plan.cross_pairs(c) == [("minilm", "smollm2")]
    assert plan.plugin_view(c, "smollm2") == "prefix"
    runs = plan.training_runs(c)
    variants = len(c["training"]["variants"])  # partial_fixed, partial_learned, subset_only, linformer, nystrom
    seeds = len(c["training"]["seeds"])
    sizes = sum(len(plan.training_sizes(c, m)) for m in ("scratch", "finetune"))  # 1 + 2 by default
    assert variants == 5 and len(runs) == seeds * (2 * 2 + variants * sizes)
    # paired: every variant runs with exactly the seeds of exact and of the uniform floor
    by = {}
    for r in runs:
        by.setdefault((r["mode"], r["tvariant"], r["s"]), set()).add(r["seed"])
    assert set(map(frozenset, by.values())) == {frozenset(c["training"]["seeds"])}
    assert plan.model_spec(c, c["training"]["analysis_model"])["run"] == plan.trained_run(c)


# ------------------------------------------- defaults that adapt, explicit asks that are checked

DEFAULT = [str(REPO / "config.yaml")]
TINY = [str(REPO / "config.yaml"), str(REPO / "tests" / "config.yaml")]
# a user's own single model: a new name for the same source as minilm
MINE = {"models": {"mine": _config()["models"]["minilm"]}, "run_models": ["mine"]}


def _dry_run(tmp_path, configs, override):
    cfg = tmp_path / "override.yaml"
    cfg.write_text(yaml.safe_dump(override))
    proc = snakemake(tmp_path, "-n", configs=[*configs, str(cfg)], check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "configs,override,models",
    [
        (TINY, {"run_models": ["minilm"]}, 1),
        (TINY, {"run_models": ["smollm2"]}, 1),
        (TINY, MINE, 1),
        (DEFAULT, {"run_models": ["minilm"]}, 1),
        (DEFAULT, {"sampling": {"n_sequences": {"fit": 8}}}, 2),  # the default chunk of 8 would leave no two halves
    ],
)
def test_defaults_adapt_to_the_run(tmp_path, configs, override, models):
    """One model, or a small sample, plans with no other change: the transfer list drops other_model,
    the scaling study follows the run's models and the chunk length leaves two halves."""
    rc, out = _dry_run(tmp_path, configs, override)
    assert rc == 0, out[-3000:]
    for rule in ("extract_scores", "eigen_rows", "overlap_within", "reconstruct_view", "claims", "scaling_table"):
        assert rule in out, rule
    assert ("overlap_cross" in out) == (models == 2)


@pytest.mark.parametrize(
    "configs,override,needle",
    [
        (
            DEFAULT,
            {"run_models": ["minilm"], "reconstruction": {"transfer": ["adjacent_layer", "other_model"]}},
            "reconstruction.transfer': lists other_model, but fewer than two models are analysed",
        ),
        (
            TINY,
            {"run_models": ["smollm2"], "reconstruction": {"transfer": ["other_model"]}},
            "reconstruction.transfer': lists other_model",
        ),
        (
            DEFAULT,
            {"sampling": {"n_sequences": {"fit": 8}}, "extraction": {"chunk_sequences": 8}},
            "extraction.chunk_sequences': 8 covers all 8 fit passages",
        ),
        (
            DEFAULT,
            {"extraction": {"batch_size": 12, "chunk_sequences": 8}},
            "extraction.batch_size': 12 is not a multiple of extraction.chunk_sequences = 8",
        ),
        (
            TINY,
            {"run_models": ["smollm2"], "scaling": {"models": ["minilm"]}},
            "scaling.models[0]': 'minilm' is not in run_models",
        ),
    ],
)
def test_explicit_asks_that_cannot_work_are_refused(tmp_path, configs, override, needle):
    rc, out = _dry_run(tmp_path, configs, override)
    assert rc != 0 and needle in out, out[-3000:]
    assert "fix:" in out and "jobid" not in out


def _with(c, **sections):
    c = validate({**c, **sections})
    check(c)
    return c


@pytest.mark.parametrize(
    "fit,batch,chunk",
    [
        (384, 8, 8),
        (16, 8, 8),
        (15, 8, 4),
        (8, 8, 4),
        (7, 8, 2),
        (4, 8, 2),
        (3, 8, 1),
        (2, 8, 1),
        (384, 12, 6),
        (8, 6, 3),
        (384, 32, 8),
        (384, 7, 7),
        (12, 7, 1),
    ],
)
def test_chunk_sequences_auto_leaves_two_halves(fit, batch, chunk):
    c = _with(
        {"models": _config()["models"], "corpora": _config()["corpora"]},
        sampling={"n_sequences": {"fit": fit, "heldout": 4}},
        plugin={"n_sequences": 4},
        extraction={"batch_size": batch},
    )
    assert c["extraction"]["chunk_sequences"] == "auto"
    assert plan.chunk_sequences(c) == chunk == plan.extraction(c)["chunk_sequences"]


def test_transfer_and_scaling_auto_follow_the_run_models():
    both = _with(_config())
    assert both["reconstruction"]["transfer"] == "auto"
    assert plan.transfers(both) == ["adjacent_layer", "farthest_layer", "other_model"]
    assert plan.other_models(both, "minilm", "prefix") == ["smollm2"] and plan.other_models(both, "minilm", "all") == []
    assert plan.scaling_models(both) == ["minilm"] and plan.notes(both) == []  # tests/config.yaml: first
    one = _with(_config(), run_models=["smollm2"])
    assert plan.transfers(one) == plan.reconstruction(one)["transfer"] == ["adjacent_layer", "farthest_layer"]
    assert plan.other_models(one, "smollm2", "prefix") == []
    assert plan.scaling_models(one) == plan.sample_models(one) == ["smollm2"]
    assert any(n.startswith("reconstruction.transfer: auto -> adjacent_layer, farthest_layer") for n in plan.notes(one))
    # two bidirectional models analysed in the `all` view only: no prefix view to transfer across
    minilm = _config()["models"]["minilm"]
    no_prefix = _with(
        _config(),
        models={**_config()["models"], "m2": minilm},
        run_models=["minilm", "m2"],
        eigen={"views": ["all"]},
        overlap={"k": [2, 4, 8], "cross_pairs": []},
    )
    assert plan.transfers(no_prefix) == ["adjacent_layer", "farthest_layer"]
    # scaling auto leaves out a model whose positions hold fewer than two lengths, and says so
    short = {**minilm, "max_positions": 48}
    left = _with(
        _config(),
        models={**_config()["models"], "short": short},
        run_models=["short", "minilm"],
        scaling={**_config()["scaling"], "models": "auto", "lengths": [32, 64]},
    )
    assert plan.scaling_models(left) == ["minilm"]
    assert any("leaves out short" in n for n in plan.notes(left))


# ------------------------------------------------------------------ local model folders (source: path)


def _path_model(folder) -> dict:
    return {"models": {"mymodel": {"source": "path", "path": str(folder), "causal": False}}, "run_models": ["mymodel"]}


def test_missing_model_folder_is_refused_before_any_job(tmp_path):
    rc, out = _dry_run(tmp_path, TINY, _path_model(tmp_path / "no-such-folder"))
    assert rc != 0, out[-3000:]
    assert "models.mymodel.path': the folder" in out and "does not exist" in out, out[-3000:]
    assert "fix:" in out and "jobid" not in out


def test_unused_model_folder_is_not_checked(tmp_path):
    unused = {"models": {"unused": {"source": "path", "path": str(tmp_path / "gone"), "causal": False}}}
    rc, out = _dry_run(tmp_path, TINY, unused)
    assert rc == 0, out[-3000:]


def _jobs(out: str) -> set[str]:
    table = out.split("Job stats:")[-1] if "Job stats:" in out else ""
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip() and line.split()[0] != "total"}


def test_editing_a_model_folder_refetches_it(tmp_path):
    """A `source: path` model's files are inputs of its fetch rule: an edit re-fetches the model (and
    so re-runs what reads it), an untouched folder does not."""
    import os

    src = tmp_path / "my-model"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (src / name).write_text("{}")
    work = tmp_path / "work"
    (work / "resources" / "models" / "mymodel").mkdir(parents=True)  # a fetched copy, newer than its source
    later = (src / "config.json").stat().st_mtime + 100
    os.utime(work / "resources" / "models" / "mymodel", (later, later))
    target = "resources/models/mymodel"
    cfg = work / "override.yaml"
    cfg.write_text(yaml.safe_dump(_path_model(src)))
    proc = snakemake(work, "-n", target, configs=[*TINY, str(cfg)], check=False)
    assert proc.returncode == 0 and "fetch_model" not in _jobs(proc.stdout + proc.stderr), proc.stdout[-3000:]
    (src / "config.json").write_text('{"edited": true}')
    os.utime(src / "config.json", (later + 100, later + 100))
    proc = snakemake(work, "-n", target, configs=[*TINY, str(cfg)], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "fetch_model" in _jobs(out), out[-3000:]
    assert str(src / "config.json") in out  # the reason names the edited file


# ------------------------------------------------------------------------- values from the command line


def test_nested_command_line_values_are_typed(tmp_path):
    """`--config 'sampling={seq_len: 64}'` reaches the schema as an integer (Snakemake parses nested
    values as strings), lists of numbers too; a value of the wrong type is still refused by name."""
    proc = snakemake(
        tmp_path, "-n", "--config", "sampling={seq_len: 64}", "overlap={k: [2, 4]}", configs=TINY, check=False
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = snakemake(tmp_path, "-n", "--config", "sampling={seq_len: 2048}", configs=DEFAULT, check=False)
    assert "sampling.seq_len': 2048 exceeds the 512 positions of model 'minilm'" in proc.stdout + proc.stderr
    proc = snakemake(tmp_path, "-n", "--config", "sampling={seq_len: long}", configs=DEFAULT, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "sampling.seq_len': 'long' is not of type 'integer'" in out, out[-3000:]


def test_command_line_strings_are_coerced_by_the_schema():
    from snakemake.utils import update_config

    c = _config()
    overrides = {
        "sampling": {"seq_len": "64", "heldout_fraction": "0.25", "n_sequences": {"fit": "16"}},
        "eigen": {"views": ["prefix"], "full_rank": "null", "report_k": ["1", "2"]},
        "extraction": {"chunk_sequences": "auto"},
        "models": {"minilm": {"causal": "false", "layers": ["0", "1"]}},
        "corpora": {"enwiki-sample": {"member": "0123"}},  # a string where the schema wants one
    }
    update_config(c, overrides)  # as Snakemake does with --config, before the Snakefile sees it
    c = validate(validation.coerce_overrides(c, overrides))
    assert c["sampling"]["seq_len"] == 64 and c["sampling"]["heldout_fraction"] == 0.25
    assert c["sampling"]["n_sequences"] == {"fit": 16, "heldout": 6}
    assert c["eigen"]["views"] == ["prefix"] and c["eigen"]["full_rank"] is None and c["eigen"]["report_k"] == [1, 2]
    assert c["extraction"]["chunk_sequences"] == "auto"
    assert c["models"]["minilm"]["causal"] is False and c["models"]["minilm"]["layers"] == [0, 1]
    assert c["corpora"]["enwiki-sample"]["member"] == "0123"


# ---------------------------------------------------------------------------------- helpful messages


@pytest.mark.parametrize(
    "section,values,bound",
    [
        ("overlap", {"k": [4, 8, 200]}, "use k <= 64"),
        ("reconstruction", {"subset_sizes": [4, 200]}, "use subset sizes <= 64"),
    ],
)
def test_bound_is_over_every_view_that_runs(section, values, bound):
    """minilm's `all` view has d = 128, its `prefix` view and smollm2's 64: the first refusal gives
    the bound that every view meets, so following it does not fail again."""
    c = validate({**_config(), "sampling": {"seq_len": 128}, section: values})
    with pytest.raises(ConfigError) as e:
        check(c)
    assert bound in str(e.value) and "prefix" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "section,values,needles",
    [
        ("eigen", {"views": ["middle"]}, ["eigen.views", "'middle'", "all, prefix", "auto"]),
        ("scaling", {"models": "all"}, ["scaling.models", "'all'", "auto", "first", "a list"]),
        ("eigen", {"full_rank": 0}, ["eigen.full_rank", "0 is less than the minimum of 1", "null"]),
        ("reconstruction", {"transfer": ["sideways"]}, ["'sideways'", "adjacent_layer, farthest_layer, other_model"]),
    ],
)
def test_one_of_errors_name_the_value_and_the_allowed_ones(section, values, needles):
    c = _config()
    c[section] = {**c.get(section, {}), **values}
    with pytest.raises(ConfigError) as e:
        validate(c)
    msg = str(e.value)
    assert "is not valid under any of the given schemas" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_the_recorded_model_spec_does_not_depend_on_the_merge_order():
    """`--configfile tests/config.yaml` and `--configfile config.yaml tests/config.yaml` merge a
    model's keys in different orders; Snakemake compares recorded params in order, so the fetch
    rule re-fetched the model (and re-ran everything after it) when only the order differed."""
    one = {"source": "pypi", "package": "p==1", "sha256": {"b": "2", "a": "1"}, "layers": [0, 1], "causal": True}
    other = {"layers": [0, 1], "causal": True, "sha256": {"a": "1", "b": "2"}, "package": "p==1", "source": "pypi"}
    training = {"analysis_model": "trained"}
    a = plan.recorded_spec({"models": {"m": one}, "training": training}, "m")
    b = plan.recorded_spec({"models": {"m": other}, "training": training}, "m")
    assert repr(a) == repr(b)
