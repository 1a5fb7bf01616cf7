"""The feature file as other tools read it (docs/FORMAT.md, format v2): xarray through both
its netCDF engines, PyTables, h5repack.  Each foreign reader runs in a child process, so a
reader that crashes fails its test instead of killing pytest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from featx.extract import extract
from featx.sources import folder_source
from featx.store import FeatureStore

from conftest import small_config


@pytest.fixture
def multi_tap(image_tree, tmp_path):
    """A file of two taps (one pooled two ways) with one failed image."""
    (image_tree / "val" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    r = extract(folder_source(image_tree, "val"), tmp_path / "f.h5",
                small_config(layers=("features.4", "features"), pools=("avg", "max")))
    return r.out


def child(code: str, *args) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"the reader failed (exit {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


XARRAY = """
import json, sys, warnings
import xarray as xr
path, engine = sys.argv[1], sys.argv[2]
warnings.simplefilter("error")  # a reader's complaint about the file fails the test
root = xr.open_dataset(path, engine=engine)
taps = xr.open_dataset(path, engine=engine, group="taps")
failed = xr.open_dataset(path, engine=engine, group="failed")
both = xr.merge([root, taps])  # one row dimension: taps line up with ids
print(json.dumps({
    "root": {k: list(v.dims) for k, v in root.variables.items()},
    "coords": list(root.coords),
    "taps": {k: list(v.dims) for k, v in taps.variables.items()},
    "failed": {k: list(v.dims) for k, v in failed.variables.items()},
    "ids": [str(i) for i in both["ids"].values],
    "tap": both["features.4@max"].values.tolist(),
    "complete": int(root.attrs["complete"]),
}))
"""


@pytest.mark.parametrize("engine", ["h5netcdf", "netcdf4"])
def test_xarray_names_the_dimensions_and_taps_share_the_rows(multi_tap, engine):
    pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf" if engine == "h5netcdf" else "netCDF4")
    got = child(XARRAY, multi_tap, engine)
    assert got["root"]["features"] == ["item", "feature_features.4@avg"]  # the default tap, the first asked
    assert got["root"]["labels"] == ["item"] and got["root"]["classes"] == ["class"] and got["coords"] == ["ids"]
    assert got["taps"] == {"features.4@avg": ["item", "feature_features.4@avg"],
                           "features.4@max": ["item", "feature_features.4@max"],
                           "features@avg": ["item", "feature_features@avg"],
                           "features@max": ["item", "feature_features@max"]}
    assert got["failed"] == {"ids": ["failure"], "reasons": ["failure"]}
    with FeatureStore(multi_tap) as fs:
        assert got["ids"] == fs.ids and len(fs.failed) == 1
        np.testing.assert_array_equal(np.asarray(got["tap"], np.float32), fs.features("features.4@max"))
    assert got["complete"] == 1


def test_complete_is_an_integer_that_pytables_reads(multi_tap):
    pytest.importorskip("tables")
    with h5py.File(multi_tap) as f:
        assert f.attrs["complete"].dtype == np.int8 and f.attrs["complete"] == 1 and f.attrs["format_version"] == 2
    got = child("""
import json, sys, tables
with tables.open_file(sys.argv[1]) as f:
    print(json.dumps({"complete": int(f.root._v_attrs.complete), "labels": f.root.labels.read().tolist(),
                      "tap": f.get_node("/taps", "features@avg").read().tolist()}))
""", multi_tap)
    with FeatureStore(multi_tap) as fs:
        assert got["complete"] == 1 and got["labels"] == fs.labels.tolist()
        np.testing.assert_array_equal(np.asarray(got["tap"], np.float32), fs.features("features@avg"))


def test_empty_failure_datasets_are_chunked_and_resizable(image_tree, tmp_path):
    """h5repack's filters failed at empty contiguous datasets (a file with no failure)."""
    r = extract(folder_source(image_tree, "val"), tmp_path / "f.h5", small_config())
    with h5py.File(r.out) as f:
        for name in ("failed/ids", "failed/reasons"):
            assert f[name].shape == (0,) and f[name].chunks and f[name].maxshape == (None,)
    if shutil.which("h5repack") is None:
        pytest.skip("h5repack (Debian hdf5-tools) not installed")
    subprocess.run(["h5repack", "-f", "SHUF", "-f", "GZIP=4", r.out, tmp_path / "packed.h5"], check=True)
    with FeatureStore(r.out) as a, FeatureStore(tmp_path / "packed.h5") as b:
        np.testing.assert_array_equal(a.features(), b.features())
        assert a.ids == b.ids and b.failed == []
