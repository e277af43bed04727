"""The one store writer (new_store) and the one store opener (open_store) of eigenattn.storage.store:
no half-written store ever looks complete, and an incomplete one is refused, naming it and the fix."""

import json

import numpy as np
import pytest
import zarr

from eigenattn import __version__
from eigenattn.errors import InputError
from eigenattn.storage.store import new_store, open_store


def test_round_trip_adds_version_complete_and_consolidated_metadata(tmp_path):
    out = tmp_path / "results" / "a.zarr"  # the parent is created
    with new_store(out) as root:
        root.create_array("x", data=np.arange(6, dtype=np.float32).reshape(2, 3), dimension_names=["a", "b"])
        root.require_group("sub").create_array("y", data=np.ones(4, dtype=np.int64))
        root.attrs.update({"model": "m", "layers": [0, 1]})
        assert not out.exists()  # filled in a temporary sibling
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.zarr"]  # no temporary left
    meta = json.loads((out / "zarr.json").read_text())
    assert meta["consolidated_metadata"]["metadata"].keys() >= {"x", "sub", "sub/y"}
    g = open_store(out)
    assert g.attrs.asdict() == {"model": "m", "layers": [0, 1], "eigenattn_version": __version__, "complete": True}
    np.testing.assert_array_equal(g["x"][:], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(g["sub/y"][:], np.ones(4))
    with pytest.raises(ValueError, match="read-only|read only"):
        g.attrs["model"] = "changed"  # read-only
    with new_store(out) as root:  # a second write replaces the store
        root.attrs["model"] = "n"
    g = open_store(out)
    assert g.attrs["model"] == "n" and "x" not in g


@pytest.mark.parametrize("existing", [False, True])
def test_error_inside_the_writer_leaves_no_store_and_no_temporary(tmp_path, existing):
    out = tmp_path / "a.zarr"
    if existing:
        with new_store(out) as root:
            root.attrs["model"] = "old"
    with pytest.raises(RuntimeError, match="boom"):
        with new_store(out) as root:
            root.create_array("x", data=np.zeros(3))
            root.attrs["model"] = "new"
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a.zarr"] if existing else [])
    if existing:
        assert open_store(out).attrs["model"] == "old"  # the finished store is untouched


@pytest.mark.parametrize("attrs", [{"complete": False}, {}, {"complete": "yes"}])
def test_opener_refuses_an_incomplete_store_naming_it_and_the_fix(tmp_path, attrs):
    out = tmp_path / "half.zarr"
    g = zarr.open_group(str(out), mode="w", zarr_format=3)  # not finished by new_store
    g.attrs.update({"model": "m", **attrs})
    with pytest.raises(InputError, match="not marked complete") as err:
        open_store(out)
    assert str(out) in str(err.value) and f"fix: re-create it: snakemake --cores all --forcerun {out}" in str(err.value)


def test_opener_refuses_a_missing_store_and_a_malformed_version(tmp_path):
    with pytest.raises(InputError, match=r"missing.zarr': not a Zarr v3 group \(no zarr.json\).*\n  fix: re-create it"):
        open_store(tmp_path / "missing.zarr")
    out = tmp_path / "v.zarr"
    zarr.open_group(str(out), mode="w", zarr_format=3).attrs.update({"complete": True, "eigenattn_version": 3})
    with pytest.raises(InputError, match=r"v.zarr': eigenattn_version is 3, not a version"):
        open_store(out)
