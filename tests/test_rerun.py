"""Re-running single stages: dry-run assertions on tests/config.yaml (README "Re-running one stage")."""

import re
import time

import yaml

from conftest import REPO, CONFIGS, snakemake


def _jobs(proc) -> dict[str, int]:
    """The job-stats table of a dry run: rule -> count."""
    out = proc.stdout + proc.stderr
    table = out.split("Job stats:")[-1] if "Job stats:" in out else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def _override(tmp_path, data) -> list[str]:
    p = tmp_path / "override.yaml"
    p.write_text(yaml.safe_dump(data))
    return [*CONFIGS, str(p)]


def test_complete_run_is_a_noop(tiny_run):
    wd, _ = tiny_run
    assert _jobs(snakemake(wd, "-n")) == {}


def test_eigen_parameter_does_not_reextract(tiny_run, tmp_path):
    wd, _ = tiny_run
    jobs = _jobs(snakemake(wd, "-n", configs=_override(tmp_path, {"eigen": {"split_every": 4}})))
    assert jobs.get("eigen_rows") == 3  # minilm all + prefix, smollm2 prefix
    assert "extract_scores" not in jobs and "sample_passages" not in jobs and "fetch_model" not in jobs
    assert "eigen_full" not in jobs  # split_every is a parameter of the row reduction only


def test_scheduler_change_reruns_nothing(tiny_run, tmp_path):
    wd, _ = tiny_run
    override = {"eigen": {"scheduler": "distributed", "slurm": {"jobs": 4}}}
    assert _jobs(snakemake(wd, "-n", configs=_override(tmp_path, override))) == {}


def test_extraction_parameter_reextracts_and_cascades(tiny_run, tmp_path):
    wd, _ = tiny_run
    jobs = _jobs(snakemake(wd, "-n", configs=_override(tmp_path, {"extraction": {"dtype": "float32"}})))
    assert jobs["extract_scores"] == 8 and "sample_passages" not in jobs
    assert jobs["eigen_rows"] == 3 and jobs["overlap_summary"] == 1


def test_forcerun_one_rule_and_its_dependents(tiny_run):
    wd, _ = tiny_run
    jobs = _jobs(snakemake(wd, "-n", "eigen", "-R", "eigen_full"))
    assert jobs == {"eigen_full": 3, "eigen_spectrum": 3, "eigen": 1}


def test_until_stops_after_a_rule(tiny_run):
    wd, _ = tiny_run
    jobs = _jobs(snakemake(wd, "-n", "-R", "sample_passages", "--until", "extract_scores"))
    assert set(jobs) == {"sample_passages", "extract_scores"}


def test_stage_targets_are_independent(tiny_run):
    wd, _ = tiny_run
    for target in ("corpus", "extract", "eigen", "overlap"):
        assert _jobs(snakemake(wd, "-n", target)) == {}, target


def test_default_config_dry_run_is_quick(tmp_path):
    t = time.perf_counter()
    proc = snakemake(tmp_path, "-n", configs=[str(REPO / "config.yaml")])
    assert time.perf_counter() - t <= 10
    assert _jobs(proc)["extract_scores"] == 4
