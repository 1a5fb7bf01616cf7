"""``featx export``: a feature file's rows for tools that do not read HDF5.

* ``parquet`` (pyarrow): one row per item with ``id``, ``label`` (null where unlabelled),
  ``class`` (its name, null where unlabelled) and ``features``, the tap's vector as a
  fixed-size list of float32 (``columns=True``: one column ``f0``, ``f1``... per dimension).
  The file's metadata key ``featx`` holds the feature file's attributes (provenance) as JSON
  and ``featx_tap`` the tap.  pandas, polars and DuckDB read it.
* ``npz`` (numpy): ``features`` (the file's dtype), ``labels``, ``ids`` and ``classes``,
  read by ``np.load``.
* ``csv``: ``id,label,class,f0,f1...``, for small files only (``CSV_MAX_BYTES``).

Every format is written chunk by chunk (``chunk_bytes`` of features at a time), so memory
stays flat in the number of rows, through a temporary file renamed into place.  Unfinished
feature files are refused, as every command refuses them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from featx.errors import FeatxError
from featx.files import atomic_path
from featx.store import FeatureStore

FORMATS = {"parquet": ".parquet", "npz": ".npz", "csv": ".csv"}
CHUNK_BYTES = 32 << 20  # features (as float32) read and written at a time: parquet's row group
CSV_MAX_BYTES = 256 << 20  # text written (about 12 bytes a value): a larger file belongs in parquet


def export_file(path: str | os.PathLike, to: str, tap: str | None = None, out: str | os.PathLike | None = None,
                columns: bool = False, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Write the rows of one tap of feature file ``path`` as ``to`` (parquet, npz or csv) to
    ``out`` (default: ``path`` with that format's suffix); returns the path written."""
    if to not in FORMATS:
        raise FeatxError(f"--to {to!r} is not one of {', '.join(FORMATS)}.")
    path = Path(path)
    out = Path(out) if out is not None else path.with_suffix(FORMATS[to])
    if out.resolve() == path.resolve():
        raise FeatxError(f"--out {out} is the feature file itself; name another file.")
    with FeatureStore(path) as fs:
        tap = tap or fs.default_tap
        ds = fs.dataset(tap)  # refuses a tap the file lacks, in one sentence
        n, dim = ds.shape
        rows = max(1, int(chunk_bytes) // max(1, dim * 4))
        chunks = [(s, min(n, s + rows)) for s in range(0, n, rows)]
        if to == "csv" and n * dim * 12 > CSV_MAX_BYTES:
            raise FeatxError(f"{path} has {n} x {dim} values (about {n * dim * 12 >> 20} MB as text), more than csv "
                             f"export writes ({CSV_MAX_BYTES >> 20} MB): export --to parquet or npz instead.")
        with atomic_path(out, "write the export") as tmp:
            {"parquet": _parquet, "npz": _npz, "csv": _csv}[to](fs, tap, chunks, tmp, columns)
    return out


def _rows(fs: FeatureStore, tap: str, start: int, end: int):
    """One chunk: features, labels, ids and class names (None where unlabelled)."""
    x = fs.dataset(tap)[start:end]
    labels = fs.labels_between(start, end)
    classes = fs.classes
    names = [classes[k] if 0 <= k < len(classes) else None for k in labels]
    return x, labels, fs.ids_between(start, end), names


def _parquet(fs: FeatureStore, tap: str, chunks: list, tmp: Path, columns: bool) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FeatxError("--to parquet needs pyarrow, which is not installed; `pip install pyarrow` adds it.") from None
    dim = fs.dim(tap)
    vector = [pa.field(f"f{j}", pa.float32()) for j in range(dim)] if columns else \
        [pa.field("features", pa.list_(pa.float32(), dim))]
    meta = {"featx": json.dumps({k: _plain(v) for k, v in fs.attrs.items()}), "featx_tap": tap}
    schema = pa.schema([pa.field("id", pa.string()), pa.field("label", pa.int64()), pa.field("class", pa.string()),
                        *vector], metadata=meta)
    with pq.ParquetWriter(tmp, schema) as writer:
        for start, end in chunks or [(0, 0)]:
            x, labels, ids, names = _rows(fs, tap, start, end)
            x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, dim)
            label = pa.array(labels, pa.int64(), mask=labels < 0)
            if columns:
                vectors = [pa.array(x[:, j]) for j in range(dim)]
            else:
                vectors = [pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)]
            writer.write_table(pa.Table.from_arrays([pa.array(ids, pa.string()), label, pa.array(names, pa.string()),
                                                     *vectors], schema=schema))


def _npz(fs: FeatureStore, tap: str, chunks: list, tmp: Path, columns: bool) -> None:
    ds = fs.dataset(tap)
    n, dim = ds.shape
    width = max([len(i) for s, e in chunks for i in fs.ids_between(s, e)] or [1])
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, dtype, shape, part in (
                ("features", fs.feature_dtype, (n, dim), lambda s, e: ds[s:e]),
                ("labels", np.dtype(np.int64), (n,), fs.labels_between),
                ("ids", np.dtype(f"<U{width}"), (n,), lambda s, e: np.asarray(fs.ids_between(s, e), f"<U{width}"))):
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                         "fortran_order": False, "shape": shape})
                for s, e in chunks:
                    f.write(np.ascontiguousarray(part(s, e), dtype=dtype).tobytes())
        buf = io.BytesIO()
        np.save(buf, np.asarray(fs.classes, dtype=str))
        z.writestr("classes.npy", buf.getvalue())


def _csv(fs: FeatureStore, tap: str, chunks: list, tmp: Path, columns: bool) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "class", *(f"f{j}" for j in range(fs.dim(tap)))])
        for start, end in chunks:
            x, labels, ids, names = _rows(fs, tap, start, end)
            for i, label, name, v in zip(ids, labels, names, x):
                w.writerow([i, "" if label < 0 else int(label), name or "", *(repr(float(a)) for a in v)])


def _plain(v):
    """An HDF5 attribute as a JSON value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
