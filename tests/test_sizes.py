"""The score stores' size is known before any job: the formula against stores the extraction really
writes, the sizes a dry run states, and a run refused before any job when its stores cannot fit
the free disk (README, Configuration)."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, snakemake, snakemake_env
from eigenattn.config import disk, plan, settings
from eigenattn.config.settings import ModelFacts
from eigenattn.config.validation import check_model_facts, check_store_room, validate
from eigenattn.errors import ConfigError
from eigenattn.storage import sizes
from tiny_models import build, texts


def _data_bytes(store: Path) -> int:
    """Bytes of the scores' shard files (its chunks, checksums and indexes; no metadata)."""
    return sum(p.stat().st_size for p in (store / "scores" / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "family,dtype,n_seq,batch,chunk",
    [
        ("qwen2", "float32", 7, 4, 2),  # grouped-query heads; a last shard half full, a chunk never written
        ("gpt_oss", "auto", 5, 4, 4),  # attention sinks (the extra sinks array); dtype decided by the probe
    ],
)
def test_formula_matches_a_store_the_extraction_writes(tmp_path, family, dtype, n_seq, batch, chunk):
    import zarr

    from eigenattn.capture.extract import extract_scores

    out = tmp_path / "shard-0.zarr"
    stats = extract_scores(
        build(family, tmp_path / family),
        texts(n_seq),
        list(range(n_seq)),
        out,
        seq_len=16,
        dtype=dtype,
        batch_size=batch,
        chunk_sequences=chunk,
        device="cpu",
        autocast="none",
        layers="all",
        compression="none",
        progress=False,
    )
    g = zarr.open_group(str(out), mode="r")
    L, H = len(g.attrs["layers"]), g.attrs["heads"]
    itemsize = sizes.ITEMSIZE[g.attrs["dtype"]]
    assert _data_bytes(out) == sizes.score_array_bytes(n_seq, L, H, 16, itemsize, chunk, batch)
    planned = sizes.score_store_bytes(n_seq, L, H, 16, g.attrs["dtype"], chunk, batch, sinks="sinks" in g)
    assert stats["bytes_planned"] == planned
    assert stats["bytes_stored"] <= planned <= stats["bytes_stored"] + sizes.METADATA + 4096


def test_extraction_refuses_a_store_that_cannot_fit_before_writing_it(tmp_path, monkeypatch):
    from eigenattn.capture.extract import extract_scores

    monkeypatch.setenv(sizes.FREE_ENV, "2.001")  # 1 MB beyond the 2 GB headroom
    out = tmp_path / "shard-0.zarr"
    with pytest.raises(ConfigError) as e:
        extract_scores(
            build("bert", tmp_path / "bert"),
            texts(64, words=200),
            list(range(64)),
            out,
            seq_len=128,  # 64 sequences x 2 layers x 4 heads x 128² x 4 bytes, and the rest: 33.7 MB
            dtype="float32",
            batch_size=8,
            chunk_sequences=8,
            device="cpu",
            autocast="none",
            layers="all",
            compression="none",
            progress=False,
            check_size=lambda nbytes: check_store_room("tiny", out, nbytes),
        )
    assert e.value.key == "models.tiny.layers" and "needs 33.7 MB" in str(e.value)
    assert "fewer sequences (sampling.n_sequences)" in e.value.fix
    assert not out.exists() and not list(tmp_path.glob(".shard-0.zarr.partial-*"))


def test_declared_layers_and_heads_are_checked_against_the_model():
    facts = {"n_layers": 30, "heads": 9, "causal": True, "mask_kinds": "causal"}
    check_model_facts(ModelFacts("m", "all", True, 30, 9), facts)
    check_model_facts(ModelFacts("m", "all", True), facts)  # not declared: nothing to check
    with pytest.raises(ConfigError, match=r"models\.m\.heads': is 12, but the model has 9 query heads"):
        check_model_facts(ModelFacts("m", "all", True, 30, 12), facts)


def test_declaring_layers_and_heads_re_runs_nothing():
    c = _default_config()
    assert plan.model_shape(c, "smollm2") == (30, 9) and plan.model_shape(c, "trained_mlm") == (2, 2)
    recorded = settings.Extraction.from_config(c, "smollm2", "fit", 0, 1, 128).params()["source"]
    assert not set(plan.SHAPE_KEYS) & set(recorded) and recorded == plan.recorded_spec(c, "smollm2")


def _default_config(**sampling):
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["sampling"].update(sampling)
    return validate(c)


def test_planned_stores_of_the_default_config():
    c = _default_config()
    stores = disk.score_stores(c)
    by = {(s.model, s.part): s for s in stores if s.part != "scaling"}
    assert set(by) == {
        ("minilm", "fit"),
        ("minilm", "heldout"),
        ("smollm2", "fit"),
        ("smollm2", "heldout"),
        ("trained_mlm", "fit"),
    }
    s = by[("smollm2", "fit")]
    assert (s.N, s.layers, s.heads, s.n, s.dtype) == (384, 30, 9, 128, "float16")
    assert s.nbytes == pytest.approx(384 * 30 * 9 * 128**2 * 2, rel=1e-3)
    # the scaling study at most max_layers (6) layers, and not at the main run's point
    assert {s.layers for s in stores if s.part == "scaling"} == {6}
    lines = disk.size_lines(c, stores)
    assert lines[2] == "smollm2 fit: 384 sequences × 30 layers × 9 heads × 128² × float16 = 3.4 GB"
    assert lines[-1].startswith("score stores in all: 10.1 GB")


def test_a_model_without_declared_heads_has_no_size_before_it_is_fetched():
    c = _default_config()
    del c["models"]["smollm2"]["heads"]
    lines = disk.size_lines(c, disk.score_stores(c))
    assert "smollm2 fit: size unknown before the model is fetched (models.smollm2.heads not set)" in lines[2]
    assert "plus the stores of unknown size" in lines[-1]


def test_stores_already_written_are_not_counted_against_the_disk(monkeypatch, tmp_path):
    c = _default_config(seq_len=2048)
    c["extraction"]["store"] = "scores"
    stores = disk.score_stores(c)
    monkeypatch.setenv(sizes.FREE_ENV, "3")
    where = str(tmp_path / "results")
    disk.check_room(c, stores, lambda s: True, where)  # a finished run: nothing left to write
    with pytest.raises(ConfigError) as e:
        disk.check_room(c, stores, lambda s: False, where)
    assert e.value.key == "extraction.store"  # its stream (or auto) keeps no score at all


def _smollm2_2048(tmp_path, store="scores") -> list[str]:
    cfg = tmp_path / "smollm2-2048.yaml"
    cfg.write_text(
        yaml.safe_dump({"run_models": ["smollm2"], "sampling": {"seq_len": 2048}, "extraction": {"store": store}})
    )
    return [str(REPO / "config.yaml"), str(cfg)]


def test_dry_run_states_the_size_of_each_store(tmp_path, monkeypatch):
    monkeypatch.setenv(sizes.FREE_ENV, "2000")
    proc = snakemake(tmp_path, "-n", configs=_smollm2_2048(tmp_path))
    out = proc.stdout + proc.stderr
    assert "smollm2 fit: 384 sequences × 30 layers × 9 heads × 2048² × float16 = 870 GB" in out
    assert "smollm2 heldout: 32 sequences × 30 layers × 9 heads × 2048² × float16 = 72.5 GB" in out
    assert "score stores in all: 958 GB" in out  # 942 GB of smollm2, the trained encoder and the scaling study
    assert "free disk at results/: 2 TB (1.8 TB usable after the headroom)" in out


def test_dry_run_refuses_stores_that_cannot_fit_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setenv(sizes.FREE_ENV, "500")
    proc = snakemake(tmp_path, "-n", configs=_smollm2_2048(tmp_path), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config key 'extraction.store': the score stores still to write need 958 GB" in out
    assert "the largest part: smollm2, 945 GB)" in out
    assert "keep fewer layers (models.smollm2.layers: a list of layer indices)" in out
    assert "a shorter sampling.seq_len" in out
    assert "stream the model's statistics instead of storing its scores (extraction.store: stream" in out
    assert "Job stats" not in out and not (tmp_path / "results").exists()


def test_dry_run_with_store_auto_plans_streamed_mode(tmp_path, monkeypatch):
    """The same run with extraction.store: auto (the default) streams smollm2: no score store of it
    is planned, its moments and token stores are, and the run fits the same disk."""
    monkeypatch.setenv(sizes.FREE_ENV, "500")
    proc = snakemake(tmp_path, "-n", configs=_smollm2_2048(tmp_path, "auto"))
    out = proc.stdout + proc.stderr
    assert "smollm2 fit:" not in out and "smollm2 heldout:" not in out
    assert "smollm2: streamed (its score stores would take 942 GB, over extraction.store_budget_gb 50)" in out
    assert "2 layer group(s) × 1 shard(s) of fit moments, row moments 2.27 GB per job" in out
    assert re.search(r"stream_moments\s+2\b", out) and re.search(r"extract_tokens\s+2\b", out), out[-3000:]
    assert re.search(r"^extract_scores\s+1\b", out, re.M)  # the trained encoder only (stored: 12.9 GB)


# --- streamed writes against the disk (config/gpu-long.yaml: qwen05 at n = 8,192, streamed) -------


def _gpu_long():
    from snakemake.utils import update_config

    c = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(c, yaml.safe_load((REPO / "config" / "gpu-long.yaml").read_text()))
    return validate(c)


def test_streamed_moments_are_planned_store_by_store():
    """By hand: qwen05 keeps 24 layers of 14 heads; the prefix view at n = 8,192 has d = 4,096 keys.
    Its moments hold and write 8 B × 14 × 2 halves × 4,098 × 4,096 = 3.76 GB per layer, so
    stream_memory_gb: 30 takes 7 layers a job: 4 groups of 6 layers, one fit shard each. The
    scaling study streams its 6 layers at n = 512 ... 8,192, one group each."""
    c = _gpu_long()
    stores = disk.moment_stores(c)
    fit = [s for s in stores if s.part == "fit"]
    assert [(s.group, s.shard, s.layers, s.heads, s.dims) for s in fit] == [(g, 0, 6, 14, (4096,)) for g in range(4)]
    per_layer = 8 * 14 * 2 * 4098 * 4096
    assert sum(s.nbytes for s in fit) == 24 * per_layer + 4 * sizes.METADATA
    scaling = [(s.n, s.group, s.layers) for s in stores if s.part == "scaling"]
    assert scaling == [(512, 0, 6), (1024, 0, 6), (2048, 0, 6), (4096, 0, 6), (8192, 0, 6)]
    assert fit[1].path("results") == Path("results/moments/qwen05/group-1/shard-0.zarr")
    s = next(s for s in stores if s.part == "scaling" and s.n == 8192)
    assert s.path("results") == Path("results/scaling/moments/qwen05/n8192/N48/group-0.zarr")


def test_streamed_jobs_over_the_memory_budget_are_refused_before_any_job():
    c = _gpu_long()
    c["extraction"]["stream_memory_gb"] = 3  # one layer takes 3.76 GB
    with pytest.raises(ConfigError, match="one layer of qwen05's streamed row moments takes 3.76 GB") as e:
        disk.check_stream_memory(c)
    assert e.value.key == "extraction.stream_memory_gb" and "at least 4" in e.value.fix
    c = _gpu_long()
    c["extraction"]["layer_groups"] = 2  # 12 layers a job: 45.1 GB
    with pytest.raises(ConfigError, match="holds 12 layers' streamed row moments, 45.1 GB") as e:
        disk.check_stream_memory(c)
    assert e.value.key == "extraction.layer_groups" and "at least 4 layer groups" in e.value.fix
    disk.check_stream_memory(_gpu_long())


def test_moment_store_paths_are_the_rules_outputs():
    """disk.MomentStore.path looks for a store where the stream_moments rules write it."""
    for smk, rule, store in (
        ("eigen.smk", "stream_moments", disk.MomentStore("m", "fit", 2, 3, 8, 4, 1, 1, (4,))),
        ("scaling.smk", "scaling_stream_moments", disk.MomentStore("m", "scaling", 1, 0, 64, 12, 1, 1, (32,))),
    ):
        text = (REPO / "workflow" / "rules" / smk).read_text()
        body = text[re.search(rf"(rule {rule}:|as {rule} with:)", text).start() :]
        pattern = re.search(r'output:\s*directory\("([^"]+)"\)', body).group(1)
        filled = pattern.format(model="m", group=store.group, shard=store.shard, n=store.n, N=store.N)
        assert Path(filled) == store.path("results")


def test_streamed_writes_are_checked_against_the_disk(tmp_path, monkeypatch):
    c = _gpu_long()
    where = tmp_path / "results"
    monkeypatch.setenv(sizes.FREE_ENV, "81")
    with pytest.raises(ConfigError) as e:
        disk.check_room(c, disk.score_stores(c), lambda s: False, str(where))
    assert e.value.key == "models.qwen05.layers"
    assert "the streamed moments still to write need 120 GB (0 B of score stores, 120 GB of streamed moments" in str(
        e.value
    )
    assert "has 81 GB free" in str(e.value)
    assert "keep fewer layers (models.qwen05.layers" in e.value.fix and "a shorter sampling.seq_len" in e.value.fix
    assert "--directory /path/to/larger/disk --configfile" in e.value.fix
    # moments already written are not counted: with the four fit groups done, the scaling study's are left
    for s in disk.moment_stores(c):
        if s.part == "fit":
            s.path(where).mkdir(parents=True)
    line = disk.check_room(c, disk.score_stores(c), lambda s: False, str(where))
    assert "to write: 0 B of score stores and 30.1 GB of streamed moments" in line, line


def test_the_larger_disk_command_names_every_file_by_its_full_path(tmp_path):
    """From the checkout, `snakemake -n --configfile config/gpu-long.yaml`: the Snakefile read
    config.yaml from the working directory, so the command on another disk gives it too."""
    repo = tmp_path / "repo"
    (repo / "config").mkdir(parents=True)
    (repo / "Snakefile").write_text('configfile: "config.yaml"\n')
    (repo / "config.yaml").write_text("{}")
    (repo / "config" / "gpu-long.yaml").write_text("{}")
    (repo / "profiles" / "slurm").mkdir(parents=True)
    argv = ["/venv/bin/snakemake", "-n", "--configfile", "config/gpu-long.yaml", "--profile", "profiles/slurm"]
    assert disk.larger_disk_command(argv, cwd=repo) == (
        f"snakemake -s {repo}/Snakefile --directory /path/to/larger/disk --configfile {repo}/config.yaml "
        f"{repo}/config/gpu-long.yaml -n --profile {repo}/profiles/slurm"
    )
    # run with a relative --directory from the checkout's parent, under python -m snakemake
    work = repo / "work"
    work.mkdir()
    argv = ["/x/snakemake/__main__.py", "-s", "repo/Snakefile", "-d", "repo/work", "--configfile", "repo/config.yaml"]
    assert disk.larger_disk_command(argv, cwd=work) == (
        f"snakemake -s {repo}/Snakefile --directory /path/to/larger/disk --configfile {repo}/config.yaml"
    )


def test_gpu_long_is_refused_before_any_job_and_the_printed_command_runs(tmp_path, monkeypatch):
    """config/gpu-long.yaml dry-run from a checkout's root on an 81 GB disk: refused because of
    its streamed moments, naming the size and the fix; the command the fix prints, pointed at
    another folder (a larger disk), then plans from anywhere."""
    import shlex
    import subprocess
    import sys

    from conftest import copy_checkout

    repo = copy_checkout(tmp_path / "repo")
    monkeypatch.setenv(sizes.FREE_ENV, "81")
    cmd = [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/gpu-long.yaml"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600, env=snakemake_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "the streamed moments still to write need 120 GB" in out, out[-3000:]
    assert "Job stats" not in out and not (repo / "results").exists()
    printed = re.search(r"with every file by its full path: (snakemake .*)", out).group(1).strip()
    big = tmp_path / "big"
    big.mkdir()
    fixed = shlex.split(printed.replace("/path/to/larger/disk", str(big)))
    assert fixed[0] == "snakemake"
    monkeypatch.setenv(sizes.FREE_ENV, "2000")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", *fixed], cwd=elsewhere, capture_output=True, text=True, timeout=600, env=snakemake_env()
    )
    assert proc.returncode == 0, (printed, (proc.stdout + proc.stderr)[-3000:])
    assert "Job stats" in proc.stdout + proc.stderr and not (repo / "results").exists()
