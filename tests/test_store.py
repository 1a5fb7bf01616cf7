import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.errors import FeatxError
from featx.extract import extract
from featx.sources import folder_source
from featx.store import FeatureStore

from conftest import small_config

GOLDEN = Path(__file__).parent / "data" / "golden_v1.h5"


def test_golden_v1_file_keeps_reading():
    with FeatureStore(GOLDEN) as fs:
        assert fs.attrs["format_version"] == 1
        assert fs.taps == ["features", "features.13"] and fs.default_tap == "features"
        np.testing.assert_array_equal(fs.features(), np.arange(12, dtype=np.float32).reshape(3, 4))
        np.testing.assert_array_equal(fs.features("features.13"), -np.arange(6, dtype=np.float32).reshape(3, 2))
        assert fs.ids == ["a/1.png", "b/2.png", "a/3.png"] and fs.labels.tolist() == [0, 1, 0]
        assert fs.classes == ["a", "b"]
        assert fs.failed == [("a/bad.png", "UnidentifiedImageError: x")]
        assert fs.tap_info("features.13") == {"layer": "features.13", "pool": "grid2"}


def test_readable_with_plain_h5py(image_tree, tmp_path):
    r = extract(folder_source(image_tree, "val"), tmp_path / "f.h5", small_config(layers=("features.4", "features")))
    with h5py.File(r.out, "r") as f:
        assert f.attrs["format"] == "featx.features" and f.attrs["complete"]
        X = f["features"][:]
        assert X.shape == (6, 32) and X.dtype == np.float32  # the first --layer is the default tap
        assert f["taps/features"].shape == (6, 1280)
        assert [s.decode() for s in f["ids"][:]][0] == "val/blue/0.jpg"
        assert f["labels"][:].tolist() == [0, 0, 0, 1, 1, 1]
        assert [s.decode() for s in f["classes"][:]] == ["blue", "red"]
        assert json.loads(f.attrs["preprocessing"])["crop"] == 32


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) not installed")
def test_h5dump_shows_the_structure():
    out = subprocess.run(["h5dump", "-H", str(GOLDEN)], capture_output=True, text=True, check=True).stdout
    for name in ('DATASET "features"', 'DATASET "labels"', 'DATASET "ids"', 'GROUP "taps"', 'GROUP "failed"'):
        assert name in out


def test_not_a_featx_file(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(FeatxError, match="not a featx feature file"):
        FeatureStore(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_text("junk")
    with pytest.raises(FeatxError, match="not a readable HDF5 file"):
        FeatureStore(tmp_path / "junk.h5")


def test_newer_format_is_refused(tmp_path):
    shutil.copy(GOLDEN, tmp_path / "v3.h5")
    with h5py.File(tmp_path / "v3.h5", "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(FeatxError, match="format version 3.*Upgrade"):
        FeatureStore(tmp_path / "v3.h5")


def test_incomplete_flag_is_respected(tmp_path):
    shutil.copy(GOLDEN, tmp_path / "x.h5")
    with h5py.File(tmp_path / "x.h5", "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(FeatxError, match="incomplete"):
        FeatureStore(tmp_path / "x.h5")


def test_row_subsets_in_any_order():
    with FeatureStore(GOLDEN) as fs:
        np.testing.assert_array_equal(fs.features(rows=np.array([2, 0])), fs.features()[[2, 0]])
