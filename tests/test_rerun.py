"""Re-running single stages: dry-run assertions on tests/config.yaml (README: "Running and re-running")."""

import os
import re

import yaml

from conftest import CONFIGS, REPO, snakemake


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
    assert jobs.get("eigen_rows") == 4  # minilm all + prefix, smollm2 prefix, the trained encoder
    assert "extract_scores" not in jobs and "sample_passages" not in jobs and "fetch_model" not in jobs
    assert "eigen_full" not in jobs  # split_every is a parameter of the row reduction only


def test_scheduler_change_reruns_nothing(tiny_run, tmp_path):
    """Where jobs run (the Dask scheduler, the full-matrix memory budget, the devices) is passed as
    an unrecorded Runtime, so changing it re-runs nothing."""
    wd, _ = tiny_run
    override = {
        "eigen": {"scheduler": "distributed", "slurm": {"jobs": 4}, "gram_memory_mb": 2048},
        **{section: {"device": "cpu"} for section in ("extraction", "plugin", "training")},
    }
    assert _jobs(snakemake(wd, "-n", configs=_override(tmp_path, override))) == {}


def test_extraction_parameter_reextracts_and_cascades(tiny_run, tmp_path):
    wd, _ = tiny_run
    jobs = _jobs(snakemake(wd, "-n", configs=_override(tmp_path, {"extraction": {"dtype": "float32"}})))
    assert jobs["extract_scores"] == 8 + 2 and "sample_passages" not in jobs  # + the trained encoder's fit shards
    assert jobs["eigen_rows"] == 4 and jobs["overlap_summary"] == 1


def test_training_parameter_reruns_only_training_and_its_notebooks(tiny_run, tmp_path):
    wd, _ = tiny_run
    proc = snakemake(wd, "-n", configs=_override(tmp_path, {"training": {"lr": 2e-3}}))
    jobs = _jobs(proc)
    # the training stage: runs, the analysis of the retrained exact encoder, the summary, the claims
    training = {"train_run", "train_summary", "extract_scores", "eigen_rows", "claims"}
    assert set(jobs) == training | {"notebook", "all"}, jobs
    assert jobs["eigen_rows"] == 1  # only the trained encoder is re-analysed, read from its run folder
    out = proc.stdout + proc.stderr
    assert jobs["notebook"] == 2 and "name=training" in out and "name=summary" in out


def test_subset_sizes_do_not_retrain_exact(tiny_run, tmp_path):
    wd, _ = tiny_run
    t = yaml.safe_load((REPO / "tests" / "config.yaml").read_text())["training"]
    jobs = _jobs(
        snakemake(
            wd, "-n", "train", configs=_override(tmp_path, {"training": {"subset_sizes": t["subset_sizes"] + [2]}})
        )
    )
    n_new = 2 * 5 * len(t["seeds"])  # both modes × the five variants (nystrom among them) × the seeds, new size only
    assert jobs == {"train_run": n_new, "train_summary": 1, "train": 1}, jobs


def test_editing_a_notebook_rerenders_only_it(tiny_run):
    wd, _ = tiny_run
    nb = wd / "notebooks" / "overlap.ipynb"  # the run's own checkout
    original = nb.read_bytes()
    st = nb.stat()
    try:
        nb.write_bytes(original + b"\n")  # an edit (Snakemake ignores a touch whose content is unchanged)
        proc = snakemake(wd, "-n")
    finally:
        nb.write_bytes(original)
        os.utime(nb, (st.st_atime, st.st_mtime))
    assert _jobs(proc) == {"notebook": 1, "all": 1}, _jobs(proc)
    assert "name=overlap" in proc.stdout + proc.stderr


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
    for target in ("corpus", "extract", "eigen", "overlap", "reconstruct", "plugin_eval", "train", "notebooks"):
        assert _jobs(snakemake(wd, "-n", target)) == {}, target


def test_default_config_dry_run_plans_without_data(tmp_path):
    """The default config plans from a bare directory (no fetched model or corpus). Its speed is not
    asserted here: a wall-clock bound flips with the machine's load (11 s against 10 s beside the
    SLURM tests); benchmarks/import_cost.py measures start-up side by side."""
    proc = snakemake(tmp_path, "-n", configs=[str(REPO / "config.yaml")])
    jobs = _jobs(proc)
    assert jobs["extract_scores"] == 4 + 1  # + the trained encoder's fit split
    assert jobs["train_run"] == 76 and "score stores in all" in proc.stderr
