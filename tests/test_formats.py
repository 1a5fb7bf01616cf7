"""The feature file as other tools read it (docs/FORMAT.md, format v2): xarray through both
its netCDF engines, PyTables, h5repack.  Each foreign reader runs in a child process, so a
reader that crashes fails its test instead of killing pytest."""

from __future__ import annotations

import importlib.util
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


def _multi_tap(image_tree, path, dtype="float32"):
    (image_tree / "val" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    return extract(folder_source(image_tree, "val"), path,
                   small_config(layers=("features.4", "features"), pools=("avg", "max"), dtype=dtype)).out


@pytest.fixture
def multi_tap(image_tree, tmp_path):
    """A file of two taps (one pooled two ways) with one failed image."""
    return _multi_tap(image_tree, tmp_path / "f.h5")


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


@pytest.mark.parametrize("engine", ["netcdf4", "h5netcdf"])
def test_a_float16_file_opens_in_xarray_without_crashing_the_reader(image_tree, tmp_path, engine):
    """netCDF-C has no half type: a float16 dataset segfaulted the netcdf4 engine (and
    netCDF4-python, R's ncdf4). In a child process, so a crash fails this test only."""
    pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf" if engine == "h5netcdf" else "netCDF4")
    path = _multi_tap(image_tree, tmp_path / "half.h5", dtype="float16")
    got = child(XARRAY, path, engine)
    assert got["taps"]["features.4@max"] == ["item", "feature_features.4@max"] and got["complete"] == 1
    with FeatureStore(path) as fs:
        assert fs.feature_dtype == np.float16 and got["ids"] == fs.ids
        x = fs.features("features.4@max")
    np.testing.assert_array_equal(np.asarray(got["tap"], np.float32), x)
    np.testing.assert_array_equal(x, x.astype(np.float16).astype(np.float32))  # half values


NETCDF_TAPS = """
import json, sys, netCDF4
with netCDF4.Dataset(sys.argv[1]) as f:
    print(json.dumps({k: v[:].tolist() for k, v in f["taps"].variables.items()}))
"""


def test_half_taps_of_many_chunks_read_back_exactly_in_hdf5_and_netcdf(tmp_path):
    """featx deflates a float16 file's chunks itself, in threads: rows arrive in units that do
    not line up with the chunks, and the last chunk is partly past the end."""
    from featx.store import StoreWriter

    rng = np.random.default_rng(0)
    n, unit = 1000, 300
    taps = {"wide": rng.standard_normal((n, 1024), dtype=np.float32) * 100,
            "narrow": np.maximum(rng.standard_normal((n, 3), dtype=np.float32), 0)}  # ReLU-like zeros
    w = StoreWriter(tmp_path / "h.h5", {"backbone": "b", "fingerprint": "{}"}, n,
                    {k: {"dim": v.shape[1]} for k, v in taps.items()}, unit_items=unit, dtype="float16").prepare()
    for s in range(0, n, unit):
        w.add(s, min(n, s + unit), {k: v[s:s + unit] for k, v in taps.items()}, np.zeros(min(unit, n - s), np.int64),
              [f"i{k}" for k in range(s, min(n, s + unit))], [], [])
    path = w.finalize(["c"], "wide")
    with h5py.File(path) as f:
        ds = f["taps/wide"]
        assert ds.chunks == (256, 1024) and ds.id.get_num_chunks() == 4  # 3 whole chunks and an edge chunk
    with FeatureStore(path) as fs:
        for k, x in taps.items():
            np.testing.assert_array_equal(fs.features(k), x.astype(np.float16).astype(np.float32))
    if importlib.util.find_spec("netCDF4") is not None:
        got = child(NETCDF_TAPS, path)
        for k, x in taps.items():
            np.testing.assert_array_equal(np.asarray(got[k], np.float32), x.astype(np.float16).astype(np.float32))


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


def test_parquet_export_reads_the_same_rows_in_pandas_pyarrow_duckdb_and_polars(multi_tap, tmp_path, run_cli):
    pq = pytest.importorskip("pyarrow.parquet")
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "f.parquet"
    r = run_cli("export", multi_tap, "--to", "parquet", "--tap", "features.4@max", "--out", out)
    assert r.exit_code == 0, r.output
    with FeatureStore(multi_tap) as fs:
        x, ids, labels, classes = fs.features("features.4@max"), fs.ids, fs.labels, fs.classes
        attrs = fs.attrs
    table = pq.read_table(out)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["featx_tap"] == "features.4@max" and json.loads(meta["featx"])["backbone"] == attrs["backbone"]
    df = pd.read_parquet(out)
    assert df["id"].tolist() == ids and df["label"].tolist() == labels.tolist()
    assert df["class"].tolist() == [classes[k] for k in labels]
    np.testing.assert_array_equal(np.stack(df["features"].to_numpy()), x)
    rows = duckdb.sql(f"SELECT id, label, class, features FROM read_parquet('{out}') ORDER BY id").fetchall()
    order = np.argsort(ids)
    assert [row[0] for row in rows] == [ids[i] for i in order]
    np.testing.assert_array_equal(np.asarray([row[3] for row in rows], np.float32), x[order])
    if importlib.util.find_spec("polars") is not None:  # FORMAT.md's polars line (a test extra)
        import polars as pl

        frame = pl.read_parquet(out)
        assert frame["id"].to_list() == ids and frame["label"].to_list() == labels.tolist()
        np.testing.assert_array_equal(frame["features"].to_numpy().astype(np.float32), x)


def test_every_export_equals_the_file_whatever_the_chunk(multi_tap, tmp_path):
    """Chunk by chunk (here 2 rows at a time) gives what one chunk gives; an unlabelled row
    exports as a missing label and class, never as the last class."""
    pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    import h5py as _h5

    from featx.export import export_file

    with _h5.File(multi_tap, "a") as f:
        f["labels"][1] = -1
    with FeatureStore(multi_tap) as fs:
        x, ids, labels = fs.features(), fs.ids, fs.labels
    chunk = 2 * x.shape[1] * 4
    z = np.load(export_file(multi_tap, "npz", out=tmp_path / "f.npz", chunk_bytes=chunk))
    np.testing.assert_array_equal(z["features"], x)
    assert z["ids"].tolist() == ids and z["labels"].tolist() == labels.tolist() and z["classes"].tolist() == ["blue",
                                                                                                              "red"]
    df = pd.read_csv(export_file(multi_tap, "csv", out=tmp_path / "f.csv", chunk_bytes=chunk))
    assert df["id"].tolist() == ids and pd.isna(df["label"][1]) and pd.isna(df["class"][1])
    np.testing.assert_allclose(df[[f"f{j}" for j in range(x.shape[1])]].to_numpy(), x, rtol=1e-6)
    wide = pd.read_parquet(export_file(multi_tap, "parquet", out=tmp_path / "w.parquet", columns=True,
                                       chunk_bytes=chunk))
    np.testing.assert_array_equal(wide[[f"f{j}" for j in range(x.shape[1])]].to_numpy(), x)
    assert pd.isna(wide["label"][1]) and pd.isna(wide["class"][1]) and len(wide) == len(ids)


def test_npz_export_of_a_float16_file_keeps_half_precision(image_tree, tmp_path):
    from featx.export import export_file

    path = _multi_tap(image_tree, tmp_path / "half.h5", dtype="float16")
    z = np.load(export_file(path, "npz", out=tmp_path / "half.npz"))
    with FeatureStore(path) as fs:
        assert z["features"].dtype == np.float16
        np.testing.assert_array_equal(z["features"].astype(np.float32), fs.features())


def test_export_refusals_are_one_sentence(multi_tap, tmp_path, run_cli, monkeypatch):
    from featx import export

    r = run_cli("export", multi_tap, "--to", "npz", "--tap", "nope", "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "has no tap 'nope'" in r.stderr and not (tmp_path / "x.npz").exists()
    monkeypatch.setattr(export, "CSV_MAX_BYTES", 100)
    r = run_cli("export", multi_tap, "--to", "csv", "--out", tmp_path / "x.csv")
    assert r.exit_code == 1 and "export --to parquet or npz instead" in r.stderr and not (tmp_path / "x.csv").exists()
    r = run_cli("export", multi_tap, "--to", "npz", "--out", multi_tap)
    assert r.exit_code == 1 and "is the feature file itself" in r.stderr
    shutil.move(multi_tap, tmp_path / "moved.h5")
    (tmp_path / "f.h5.parts").mkdir()  # an extraction that has not finished
    r = run_cli("export", tmp_path / "f.h5", "--to", "npz")
    assert r.exit_code == 1 and "is not complete yet" in r.stderr


def test_the_pandas_snippet_of_format_md_keeps_unlabelled_rows_missing(multi_tap):
    pd = pytest.importorskip("pandas")
    with h5py.File(multi_tap, "a") as f:
        f["labels"][0] = -1
    with h5py.File(multi_tap, "r") as f:  # FORMAT.md's snippet
        df = pd.DataFrame(f["features"][:], index=pd.Index(f["ids"].asstr()[:], name="id"))
        df["label"] = pd.Categorical.from_codes(f["labels"][:], categories=list(f["classes"].asstr()[:]))
    with FeatureStore(multi_tap) as fs:
        assert df.index.tolist() == fs.ids and pd.isna(df["label"].iloc[0])
        assert df["label"].iloc[1:].tolist() == [fs.classes[k] for k in fs.labels[1:]]


def test_export_where_it_cannot_write_is_one_sentence_and_leaves_nothing(multi_tap, tmp_path, run_cli):
    (tmp_path / "afile").write_text("a file where a folder should be")
    r = run_cli("export", multi_tap, "--to", "parquet", "--out", tmp_path / "afile" / "x.parquet")
    assert r.exit_code == 1 and "afile" in r.stderr and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data", "f.h5"]
