"""envs/*.yaml and pyproject.toml pin the same versions."""

import re
import tomllib

import yaml

from conftest import REPO


def _pins(reqs):
    out = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^;\s]+)$", r.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_envs_match_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins(project["dependencies"])
    assert pins["torch"] == "2.13.0"
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        deps = yaml.safe_load(env.read_text())["dependencies"]
        pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
        env_pins = _pins(pip)
        assert env_pins, env
        for name, version in env_pins.items():
            assert pins.get(name) == version, f"{env.name}: {name}=={version} but pyproject pins {pins.get(name)}"
        missing = set(pins) - set(env_pins)
        assert not missing, f"{env.name} lacks {sorted(missing)}"


def test_every_dependency_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["test"]:
        assert "==" in req, req
