"""Bad configs fail before any job runs (or, for what needs data, in the rule that has it), name the
key and the fix, and leave nothing under results/."""

import pytest
import yaml

from conftest import REPO, snakemake
from eigenattn.config import plan
from eigenattn.config.validation import check, validate
from eigenattn.errors import ConfigError


def _config():
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c.update({k: v for k, v in yaml.safe_load((REPO / "tests" / "config.yaml").read_text()).items()
              if k != "models"})
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


@pytest.mark.parametrize("override,needle", [
    ({"run_models": ["minilm", "nosuchmodel"]}, "run_models[1]': unknown model 'nosuchmodel'"),
    ({"sampling": {"seq_len": 1024}}, "sampling.seq_len': 1024 exceeds the 512 positions of model 'minilm'"),
    ({"sampling": {"seq_lne": 64}}, "unknown key 'sampling.seq_lne' (misspelt?)"),
    ({"extraction": {"dtype": "float8"}}, "extraction.dtype'"),
    ({"models": {"hubmodel": {"source": "hub", "repo_id": "org/x", "revision": "main"}},
      "run_models": ["hubmodel"]}, "models.hubmodel.causal': is not set"),
    ({"eigen": {"views": ["all", "prefix"]}}, "eigen.views': view 'all' is undefined for the causal model 'smollm2'"),
    ({"eigen": {"variants": ["centred"]}}, "eigen.variants.0'"),
    ({"eigen": {"scheduler": "mpi"}}, "eigen.scheduler'"),
    ({"reconstruction": {"subset_sizes": [4, 100]}},
     "reconstruction.subset_sizes': s = [100] exceeds the d = 64 keys of view 'prefix'"),
    ({"reconstruction": {"estimators": ["pca"]}}, "reconstruction.estimators.0'"),
    ({"plugin": {"strategies": ["greedy"]}}, "plugin.strategies.0'"),
    ({"plugin": {"n_sequences": 500}}, "plugin.n_sequences': 500 exceeds the 32 held-out passages"),
    ({"eigen": {"variants": ["row_centered"]}}, "eigen.variants': reconstruction fits on the 'raw' row spectra"),
    ({"run_models": ["minilm", "minilm"]}, "run_models': ['minilm', 'minilm'] has non-unique elements"),
])
def test_bad_config_fails_before_any_job(workdir, override, needle):
    out = _run_bad(workdir, override)
    assert needle in out, out[-3000:]
    assert "fix:" in out
    assert "jobid" not in out  # no job was scheduled
    _assert_nothing_written(workdir)


@pytest.mark.parametrize("override,target,needle", [
    ({"sampling": {"n_sequences": {"fit": 100000}}}, "corpus",
     "sampling.n_sequences.fit': corpus 'enwiki-sample' offers only"),
    ({"models": {"hubmodel": {"source": "hub", "repo_id": "org/x", "revision": "main", "causal": False}},
      "run_models": ["hubmodel"], "reconstruction": {"transfer": ["adjacent_layer"]}, "scaling": {"models": []}},
     "resources/models/hubmodel", "models.hubmodel.source is 'hub', but the Hugging"),
])
def test_config_errors_that_need_data_fail_in_their_rule(workdir, monkeypatch, override, target, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _run_bad(workdir, override, target)
    log = "".join(p.read_text() for p in (workdir / "logs").rglob("*.log"))
    assert needle in out + log, (out + log)[-3000:]
    assert "fix:" in out + log
    _assert_nothing_written(workdir)


def test_wrong_sha256_names_key_and_leaves_nothing(tmp_path, resources):
    # Own working directory (no cached models), but reuse the downloaded wheels.
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "wheels").symlink_to(resources / "wheels", target_is_directory=True)
    bad = {"models": {"minilm": {"sha256": {"config.json": "0" * 64}}}, "run_models": ["minilm"],
           "reconstruction": {"transfer": ["adjacent_layer"]}, "scaling": {"models": []}}
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
    assert len(runs) == 2 * (2 + 4 * len(c["training"]["subset_sizes"]))
    assert plan.model_spec(c, c["training"]["analysis_model"])["run"] == plan.trained_run(c)
