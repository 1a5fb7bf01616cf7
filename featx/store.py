"""The featx feature store: an HDF5 file any tool can read (schema in docs/FORMAT.md).

This is the only module that imports h5py.

Writing is crash-safe by construction.  HDF5 itself is not: a process killed while HDF5
updates its metadata can leave a file that no longer opens, and several processes writing
one HDF5 file corrupt it.  So the work is cut into fixed *units* (item ranges of the
source, a multiple of the batch size, whose boundaries depend on nothing but the unit
size), each unit's rows are published as a *shard* (``<out>.parts/shard-<first>-<end>.npz``)
by an atomic rename, and one process assembles the HDF5 file from the shards when every
unit is published, under a temporary name renamed into place.  Consequences:

* a published shard is the only "done" marker: a killed run loses at most the units in
  progress, and rerunning the same command (with any number of processes) computes only
  the missing units, with the same batches, so the result is identical;
* any number of processes (torchrun ranks, nodes sharing a filesystem) can take units
  without talking to each other; assembly checks that every item is covered exactly once,
  refuses a missing, unreadable or foreign shard by name, holds one shard in memory at a
  time, and is safe when two processes try it at once (a lock; the second finds it done);
* a file at the output path is always complete; an unfinished run is visible as its parts
  folder, which ``featx info`` reports unit by unit.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featx.distributed import from_env
from featx.errors import FeatxError
from featx.files import atomic_path, cause, check_free_space, clean_stale_temps, os_error, temp_path, write_text

FORMAT_NAME = "featx.features"
FORMAT_VERSION = 2  # v2: netCDF-4 dimensions, `complete` as int8, resizable failure datasets (v1 still read)
# netCDF-4 marks a dimension that has no variable by this NAME on its dimension scale (then
# its length): netCDF-C, h5netcdf and so xarray name the axes of featx's datasets by it
NOT_A_VARIABLE = "This is a netCDF dimension but not a netCDF variable."
ROW_DIM, CLASS_DIM, FAILURE_DIM = "item", "class", "failure"
_SHARD = re.compile(r"shard-(\d{12})-(\d{12})\.npz$")
_STR = h5py.string_dtype("utf-8")


def parts_dir(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".parts")


@dataclass
class Shard:
    first: int  # first source item covered
    end: int  # one past the last source item covered
    path: Path


def featx_version() -> str:
    try:
        return importlib.metadata.version("featx")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def make_header(provenance: dict, fingerprint: dict) -> dict:
    """Root attributes of a feature file: how it was made, by what, and its fingerprint.

    Args:
        provenance: backbone, weights (id, sha256, path, seed), taps, pooling,
            preprocessing, precision, source, library versions...; dicts become JSON.
        fingerprint: what decides whether an existing output or parts folder belongs to
            the same job (settings plus the source's items).
    """
    attrs = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in provenance.items()}
    world = from_env().size
    return {**attrs, "featx_version": featx_version(), "command": command_line(),
            **({"world_size": world} if world > 1 else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": json.dumps(fingerprint, sort_keys=True)}


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user can type it again.

    ``featx`` when featx's own entry point runs (under ``torchrun -m featx`` argv[0] is the
    path of ``featx/__main__.py``, which cannot be run as given; a rerun may use any number
    of processes, so plain ``featx ...`` finishes the job), quoted for the shell.
    """
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name == "featx" or Path(argv[0]).parent.name == "featx"
                 and Path(argv[0]).name in ("__main__.py", "cli.py")):
        argv[0] = "featx"
    return shlex.join(argv)


class StoreWriter:
    """Publishes extracted rows unit by unit as shards, and assembles the final HDF5 file.

    The runner calls :meth:`add` for each batch of a unit, in item order; when a unit's last
    batch arrives the writer publishes the unit's shard.  Which units a process takes is
    :meth:`pending`; :meth:`finalize` assembles the file.

    Args:
        out: the .h5 file to produce.
        header: root attributes (:func:`make_header`); ``header["fingerprint"]`` decides
            whether an existing output or parts folder belongs to the same job.
        n_items: how many source items the job covers.
        taps: stored tap name -> ``{"layer", "pool", "dim"}``, known before the first row,
            so a shard of failures only still has the right widths.
        unit_items: items per work unit (the runner makes it a multiple of its batch size).
        dtype: stored feature dtype (shards hold it already).
    """

    def __init__(self, out: str | os.PathLike, header: dict, n_items: int, taps: dict[str, dict],
                 unit_items: int = 4096, dtype: str = "float32"):
        self.out, self.header, self.n_items = Path(out), dict(header), n_items
        self.taps, self.unit_items, self.dtype = {k: dict(v) for k, v in taps.items()}, int(unit_items), dtype
        self.parts = parts_dir(out)
        # a job: these settings cut into these units (a finished file does not depend on the
        # unit size, so its own fingerprint leaves it out)
        self.job = hashlib.sha256(f"{header['fingerprint']}/{self.unit_items}".encode()).hexdigest()[:16]
        self._buffer: list[tuple] = []
        self.already_complete = self.output_complete()

    def output_complete(self) -> bool:
        """Whether ``out`` is a complete file of this job: made with this fingerprint, or
        (a file of an older featx, whose fingerprint held other things) with the same
        setting, field by field, over the same items.  A complete file stays complete;
        only an unfinished run must match the fingerprint exactly to be continued."""
        try:
            with h5py.File(self.out, "r") as f:
                attrs = {k: f.attrs[k] for k in ("fingerprint", "setting", "complete") if k in f.attrs}
        except OSError:  # no file, or not HDF5: prepare() says which
            return False
        if not bool(attrs.get("complete")):
            return False
        return attrs.get("fingerprint") == self.header["fingerprint"] or _same_vectors(attrs, self.header)

    def prepare(self, overwrite: bool = False) -> "StoreWriter":
        """Make the parts folder ready (one process: the only one, or rank 0), refusing an
        output or unfinished run of other settings unless ``overwrite``."""
        if self.already_complete and not overwrite:
            if self.parts.exists():  # left behind by a run that finished (a removal that failed)
                _remove_tree(self.parts)
            return self
        self.already_complete = False
        if self.out.exists() and not overwrite:
            raise FeatxError(f"{self.out} already exists and {_what_is(self.out)}; use --overwrite to replace it, "
                             "or choose another --out.")
        if self.out.exists() and self.out.is_dir():
            raise FeatxError(f"--out {self.out} is a folder; give the path of the .h5 file to write.")
        if self.parts.exists() and not self.parts.is_dir():
            raise FeatxError(f"{self.parts} is a file, but featx keeps an unfinished run's work there; move it away.")
        if self.parts.exists() and self._parts_job() != self.job:
            if not overwrite:
                raise FeatxError(self._foreign_parts())
            _remove_tree(self.parts)
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.out)  # an assembly killed before its rename
            write_text(self.parts / "header.json", json.dumps(
                {**self.header, "n_items": self.n_items, "unit_items": self.unit_items, "job": self.job,
                 "tap_specs": self.taps, "dtype": self.dtype}))
        except OSError as e:
            raise os_error(e, "write", self.parts) from None
        return self

    def _foreign_parts(self) -> str:
        header = read_parts_header(self.parts)
        if header is None:
            return (f"{self.parts} holds an unfinished run of other settings, and its header.json is missing or "
                    "damaged, so featx cannot tell which command made it; use --overwrite to start over "
                    "(or remove that folder).")
        command = header.get("command")
        again = f"rerun `{command}` to finish it" if command else "rerun the command that made it to finish it"
        return (f"an unfinished run with other settings left {self.parts}; {again}, or use --overwrite "
                "(with this command) to start over.")

    def join(self, complete: bool = False) -> "StoreWriter":
        """Take part in a job another process prepared: ``complete`` is what that process
        found (the file is made already); otherwise its parts folder must be visible here."""
        self.already_complete = complete
        if not complete and self._parts_job() != self.job:
            raise FeatxError(f"{self.parts} prepared by rank 0 is not visible from {os.uname().nodename}: "
                             "--out must be on a filesystem that every node shares.")
        return self

    def _parts_job(self) -> str | None:
        """The job of the parts folder: its header's, or, when the header is missing or damaged,
        the one job its shards belong to (the header is then written again)."""
        header = read_parts_header(self.parts)
        if header is not None:
            return header.get("job")
        jobs = set()
        for s in self.shards():
            try:
                with np.load(s.path) as z:
                    jobs.add(str(z["job"]))
            except Exception:  # noqa: BLE001 - a damaged shard says nothing; assembly names it
                continue
        return self.job if jobs <= {self.job} else None

    @contextlib.contextmanager
    def claim(self, rank: int = 0, size: int = 1, log=None):
        """Hold this process's share of the job (rank of size) for the duration.

        A second process with the same share (the same command started twice) waits here,
        saying so, until the first has published its units.  Yields whether the work may
        still be this process's to do: False when the parts folder is gone, or when this
        process waited and the other one completed the file meanwhile.
        """
        try:
            fh = open(self.parts / f"rank-{rank}-of-{size}.lock", "a+")
        except FileNotFoundError:
            yield False
            return
        except OSError as e:
            raise os_error(e, "write", self.parts) from None
        try:
            waited = False
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if log:
                    log(f"another featx process is extracting {self.out} (the same work units); waiting for it "
                        "to finish them ...")
                fcntl.flock(fh, fcntl.LOCK_EX)
                waited = True
            yield self.parts.is_dir() and not (waited and self.output_complete())
        finally:
            fh.close()

    # -- units and shards -----------------------------------------------------------------

    def units(self) -> list[range]:
        return [range(s, min(s + self.unit_items, self.n_items)) for s in range(0, self.n_items, self.unit_items)]

    def shards(self) -> list[Shard]:
        return read_shards(self.parts)

    def done_ranges(self) -> list[tuple[int, int]]:
        return [(s.first, s.end) for s in self.shards()]

    def pending(self, rank: int = 0, size: int = 1) -> list[range]:
        """Units this process takes (unit index % size == rank) that no shard covers yet."""
        done = set(self.done_ranges())
        return [u for i, u in enumerate(self.units()) if i % size == rank and (u.start, u.stop) not in done]

    def missing(self) -> list[range]:
        """Item ranges that no published shard covers yet."""
        return gaps(self.done_ranges(), range(self.n_items))

    def add(self, first: int, end: int, taps: dict[str, np.ndarray] | None, labels, ids: list[str],
            failed_ids: list[str], failed_reasons: list[str], cache_hits: int = 0) -> None:
        """Rows of the source items [first, end), which follow the previous ``add`` directly.

        ``taps`` is None when no item of the range could be decoded.  The unit's shard is
        published when ``end`` reaches the end of the unit.  ``cache_hits`` counts rows that
        came from the feature cache (provenance only).
        """
        if self._buffer and first != self._buffer[-1][1]:
            raise ValueError(f"items {first}-{end} do not follow item {self._buffer[-1][1]}")
        if not self._buffer and first % self.unit_items:
            raise ValueError(f"item {first} does not start a unit of {self.unit_items} items")
        self._buffer.append((first, end, taps, labels, ids, failed_ids, failed_reasons, cache_hits))
        unit_end = min((self._buffer[0][0] // self.unit_items + 1) * self.unit_items, self.n_items)
        if end > unit_end:
            raise ValueError(f"items {first}-{end} run past the end of their unit ({unit_end})")
        if end == unit_end:
            self._publish()

    def _publish(self) -> None:
        parts, self._buffer = self._buffer, []
        arrays = {}
        for name, spec in self.taps.items():
            blocks = [p[2][name] for p in parts if p[2] is not None]
            arrays[f"tap:{name}"] = (np.concatenate(blocks) if blocks else np.zeros((0, spec["dim"]))).astype(self.dtype)
        arrays.update(
            labels=np.concatenate([np.asarray(p[3], dtype=np.int64) for p in parts]),
            ids=np.asarray([i for p in parts for i in p[4]], dtype=np.str_),
            failed_ids=np.asarray([i for p in parts for i in p[5]], dtype=np.str_),
            failed_reasons=np.asarray([r for p in parts for r in p[6]], dtype=np.str_),
            job=np.asarray(self.job),
            cache_hits=np.asarray(sum(p[7] for p in parts)),
        )
        final = self.parts / f"shard-{parts[0][0]:012d}-{parts[-1][1]:012d}.npz"
        tmp = temp_path(final)  # one temporary name per process
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self.parts.is_dir() and self.output_complete():
                return  # another process finished the job meanwhile: this unit is in the file already
            raise FeatxError(f"{os_error(e, 'write', final)} The units published so far are kept in {self.parts}: "
                             "rerun the same command to go on from there.") from None

    # -- assembly -------------------------------------------------------------------------

    def finalize(self, classes: list[str], default_tap: str, extra_attrs: dict | None = None) -> Path:
        """Check the shards and assemble the HDF5 file, one shard in memory at a time.

        Safe when several processes call it: the first assembles under a lock, the others
        find the file done.  The file is written by a child process (HDF5 cannot survive a
        failed write: closing such a file, even at exit, crashes the process), and a failure
        (a full disk...) leaves the shards as they were for a rerun.
        """
        if not self.parts.exists() and self.output_complete():
            return self.out
        with _locked(self.parts / "assemble.lock"):
            if not self.parts.exists():  # another process assembled it (and removed the parts)
                return self.out
            shards, n_rows, n_failed, hits = self._check_shards()
            need = sum(s.path.stat().st_size for s in shards) + (1 << 20)  # about what the file holds
            check_free_space(self.out.parent, need, str(self.out))
            try:
                with atomic_path(self.out, "assemble") as tmp:
                    _in_child(f"assemble {self.out}", self._assemble, tmp, shards, n_rows, n_failed, classes,
                              default_tap, {"cache_hits": hits, **(extra_attrs or {})})
            except FeatxError as e:
                raise FeatxError(f"{e} The extracted work units stay in {self.parts}: rerun the same command to "
                                 "assemble them.") from None
            _remove_tree(self.parts)
        return self.out

    def _check_shards(self) -> tuple[list[Shard], int, int, int]:
        """Every unit published exactly once by this job, every item a row or a failure."""
        missing = self.missing()
        if missing:
            raise FeatxError(f"cannot assemble {self.out}: items {', '.join(f'{r.start}-{r.stop - 1}' for r in missing[:3])}"
                             " are not extracted yet; rerun the same command to extract them.")
        units = {(u.start, u.stop) for u in self.units()}
        shards, n_rows, n_failed, hits = self.shards(), 0, 0, 0
        for s in shards:
            if (s.first, s.end) not in units:
                raise FeatxError(f"{s.path} covers items {s.first}-{s.end - 1}, which is not a work unit of this "
                                 f"job ({self.unit_items} items each): it comes from another run; remove it.")
            try:
                with np.load(s.path) as z:
                    job, rows, failed = str(z["job"]), len(z["ids"]), len(z["failed_ids"])
                    hits += int(z["cache_hits"])
            except OSError as e:
                raise os_error(e, "read", s.path) from None
            except Exception as e:  # truncated or damaged on disk
                raise FeatxError(f"shard {s.path} is unreadable ({type(e).__name__}: {e}); delete it and rerun "
                                 "the same command to extract its items again.") from None
            if job != self.job:
                raise FeatxError(f"shard {s.path} belongs to another job ({job}, not {self.job}); remove it.")
            if rows + failed != s.end - s.first:
                raise FeatxError(f"shard {s.path} holds {rows} rows and {failed} failures for {s.end - s.first} "
                                 "items; delete it and rerun the same command.")
            n_rows, n_failed = n_rows + rows, n_failed + failed
        return shards, n_rows, n_failed, hits

    def _assemble(self, path: Path, shards: list[Shard], n_rows: int, n_failed: int, classes: list[str],
                  default_tap: str, extra_attrs: dict | None) -> None:
        # a file whose writing failed must never be closed (HDF5 crashes the process then):
        # this runs in a child process (_in_child) that leaves without closing it after an error
        f = h5py.File(path, "w")
        f.attrs.update({k: (str(v) if isinstance(v, str) else v) for k, v in self.header.items()})
        f.attrs.update(extra_attrs or {})
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["complete"] = np.int8(0)  # an integer: readers without HDF5 enums (rhdf5, PyTables) see it
        f.attrs["default_tap"] = default_tap
        f.attrs["n_items"] = self.n_items
        f.attrs["n_rows"] = n_rows
        f.attrs["n_failed"] = n_failed
        f.attrs["feature_dtype"] = self.dtype
        row_dim = _dimension(f, ROW_DIM, n_rows)
        with_dims(f.create_dataset("classes", data=np.asarray(classes, dtype=object), dtype=_STR),
                  _dimension(f, CLASS_DIM, len(classes)))
        grp = f.create_group("taps", track_order=True)  # taps listed in extraction order
        for name, spec in self.taps.items():
            d = int(spec["dim"])
            chunk_rows = max(1, min(max(n_rows, 1), (1 << 20) // max(4 * d, 1)))
            ds = grp.create_dataset(name, shape=(n_rows, d), dtype=np.float32,
                                    chunks=(chunk_rows, max(d, 1)) if n_rows and d else None,
                                    **(HALF_STORAGE if self.dtype == "float16" and n_rows and d else {}))
            ds.attrs.update({k: v for k, v in spec.items() if k != "dim"})
            with_dims(ds, row_dim, _dimension(f, feature_dim(name), d))
        f["features"] = grp[default_tap]  # a hard link: the default tap, no copy
        labels = with_dims(f.create_dataset("labels", shape=(n_rows,), dtype=np.int64), row_dim)
        ids = with_dims(f.create_dataset("ids", shape=(n_rows,), dtype=_STR), row_dim, coordinate=False)
        # chunked and resizable even when empty: h5repack's filters and appending tools take them
        failures = f.create_group("failed")
        failure_dim = _dimension(failures, FAILURE_DIM, n_failed, resizable=True)
        fid, freason = (with_dims(failures.create_dataset(k, shape=(n_failed,), dtype=_STR, maxshape=(None,),
                                                          chunks=(1024,)), failure_dim, coordinate=False)
                        for k in ("ids", "reasons"))
        r = q = 0
        threads = _deflate_threads()
        with ThreadPoolExecutor(threads) as pool:
            half = {name: _HalfChunks(grp[name], pool, 2 * threads) for name in self.taps if grp[name].compression}
            for s in shards:  # one shard in memory at a time, in item order
                with np.load(s.path) as z:
                    k = len(z["ids"])
                    for name, spec in self.taps.items():
                        x = z[f"tap:{name}"]
                        if x.shape != (k, int(spec["dim"])):
                            raise FeatxError(f"shard {s.path} has {name} of shape {x.shape}, not ({k}, {spec['dim']}).")
                        if name in half:
                            half[name].add(x)
                        elif k:
                            grp[name][r:r + k] = x
                    labels[r:r + k] = z["labels"]
                    ids[r:r + k] = z["ids"].astype(object)
                    m = len(z["failed_ids"])
                    fid[q:q + m] = z["failed_ids"].astype(object)
                    freason[q:q + m] = z["failed_reasons"].astype(object)
                    r, q = r + k, q + m
            for chunks in half.values():
                chunks.close()
        f.attrs["complete"] = np.int8(1)
        f.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.close()


# float16 features are stored as float32 holding the half-rounded values, shuffled and deflated:
# netCDF-C (xarray's netcdf4 engine, R's ncdf4) has no half type and crashes on a float16 dataset,
# and every HDF5 reader has these two filters. On real features this is as small as raw float16
# (1.6-1.9 bytes per value against 2.0) and reads at about half its speed (BENCHMARKS.md).
HALF_STORAGE = {"shuffle": True, "compression": "gzip", "compression_opts": 1}


def _deflate_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class _HalfChunks:
    """Writes a HALF_STORAGE tap whole chunk by whole chunk, shuffled and deflated in threads
    (zlib leaves the GIL) and handed to HDF5 ready-made: HDF5 runs its own filters on one core.
    Writes stay in this thread, in row order; a few chunks are in flight at a time."""

    def __init__(self, ds: h5py.Dataset, pool: ThreadPoolExecutor, in_flight: int):
        self.ds, self.pool, self.most = ds, pool, in_flight
        self.buf, self.fill, self.at = np.zeros(ds.chunks, np.float32), 0, 0
        self.pending: deque = deque()

    def add(self, x: np.ndarray) -> None:
        i = 0
        while i < len(x):
            k = min(len(self.buf) - self.fill, len(x) - i)
            self.buf[self.fill:self.fill + k] = x[i:i + k]  # half values (the shards hold float16) as float32
            self.fill, i = self.fill + k, i + k
            if self.fill == len(self.buf):
                self._emit()

    def close(self) -> None:
        if self.fill:  # the edge chunk is stored whole; its rows past the end are zeros
            self.buf[self.fill:] = 0
            self._emit()
        while self.pending:
            self._write()

    def _emit(self) -> None:
        self.pending.append((self.at, self.pool.submit(_shuffle_deflate, self.buf)))
        self.buf, self.fill, self.at = np.empty_like(self.buf), 0, self.at + len(self.buf)
        while len(self.pending) > self.most:
            self._write()

    def _write(self) -> None:
        row, done = self.pending.popleft()
        self.ds.id.write_direct_chunk((row, 0), done.result())


def _shuffle_deflate(chunk: np.ndarray) -> bytes:
    """HDF5's shuffle filter (byte k of every value together) and then its deflate filter."""
    shuffled = np.ascontiguousarray(chunk.view(np.uint8).reshape(-1, chunk.itemsize).T)
    return zlib.compress(shuffled, HALF_STORAGE["compression_opts"])


def feature_dim(tap: str) -> str:
    """The netCDF dimension of a tap's features (``feature_<tap>``, at the file's root)."""
    return f"feature_{tap}"


def _dimension(group: h5py.Group, name: str, size: int, resizable: bool = False) -> h5py.Dataset:
    """A netCDF-4 dimension without a variable: a dimension scale that holds no data (HDF5
    allocates nothing for it), named as netCDF-C names such dimensions."""
    ds = group.create_dataset(name, shape=(size,), dtype="f4", maxshape=(None,) if resizable else None,
                              chunks=(1024,) if resizable else None)
    ds.make_scale(f"{NOT_A_VARIABLE}{size:10d}")
    return ds


def with_dims(ds: h5py.Dataset, *dims: h5py.Dataset, coordinate: bool = True) -> h5py.Dataset:
    """Attach dimension scales to a dataset's axes; with ``coordinate``, name ``ids`` as its
    coordinate (CF's ``coordinates`` attribute: xarray shows each row's id beside its values)."""
    for axis, dim in enumerate(dims):
        ds.dims[axis].attach_scale(dim)
    if coordinate:
        ds.attrs["coordinates"] = "ids"
    return ds


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (released by the kernel if the process dies)."""
    try:
        fh = open(path, "a+")
    except FileNotFoundError:  # the parts folder is gone: someone assembled already
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()


def _in_child(what: str, fn, *args) -> None:
    """Run ``fn(*args)`` in a forked child process and re-raise its error here (``what``:
    the work, for the sentence when the child crashes).

    HDF5 cannot survive a failed write: once writing a file failed (a full disk), closing
    it, even at the interpreter's exit, crashes the process.  The child that writes exits
    without closing anything after an error; this process stays whole and reports it.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, report, leave without running any exit handler
        os.close(read_end)

        def leave(report: dict):
            with contextlib.suppress(BaseException):
                os.write(write_end, json.dumps(report).encode())
            os._exit(0)

        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported while the failed file's objects still live:
            leave(_report_of(e))  # freeing them would close the file
        leave({"ok": True})
    os.close(write_end)
    chunks = []
    try:
        while True:
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    try:
        report = json.loads(b"".join(chunks))
    except ValueError:
        why = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) else \
            f"exit status {os.waitstatus_to_exitcode(status)}"
        raise FeatxError(f"cannot {what}: the process writing it crashed ({why}).") from None
    if "featx" in report:
        raise FeatxError(report["featx"])
    if "errno" in report:
        raise OSError(report["errno"], report["strerror"])
    if "error" in report:
        raise FeatxError(f"cannot {what}: {report['error']}.")


def _report_of(e: BaseException) -> dict:
    """An error of the child, as the parent re-raises it."""
    if isinstance(e, FeatxError):
        return {"featx": str(e)}
    if isinstance(e, OSError) and e.errno:
        return {"errno": e.errno, "strerror": e.strerror or str(e)}
    m = re.search(r"errno = (\d+)", str(e))  # HDF5 reports the system's error in its text
    if m:
        return {"errno": int(m.group(1)), "strerror": os.strerror(int(m.group(1)))}
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"error": f"{type(e).__name__}: {text}"}


def _remove_tree(path: Path) -> None:
    """Remove a parts folder: renamed away first (so that no process sees it half removed),
    then deleted; what cannot be deleted (a file another process holds open on a network
    file system) is left in the renamed folder."""
    trash = path.with_name(f"{path.name}.{os.getpid()}.removing")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def gaps(done: list[tuple[int, int]], items: range) -> list[range]:
    """The parts of ``items`` that none of the ``done`` [first, end) ranges covers."""
    out, pos = [], items.start
    for s, e in sorted(done):
        if e <= pos or s >= items.stop:
            continue
        if s > pos:
            out.append(range(pos, s))
        pos = max(pos, e)
    if pos < items.stop:
        out.append(range(pos, items.stop))
    return out


def read_shards(parts: Path) -> list[Shard]:
    if not parts.is_dir():
        return []
    out = []
    for p in parts.iterdir():
        m = _SHARD.match(p.name)
        if m:
            out.append(Shard(int(m.group(1)), int(m.group(2)), p))
    return sorted(out, key=lambda s: s.first)


def read_parts_header(parts: Path) -> dict | None:
    """An unfinished run's header.json, or None when it is missing or damaged."""
    try:
        header = json.loads((parts / "header.json").read_text())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _same_vectors(theirs: dict, mine: dict) -> bool:
    """Whether a complete file's recorded setting (its ``setting`` attribute, or what an
    older featx's fingerprint held) agrees with this job's on every field both record, over
    the same items."""
    try:
        fp_theirs, fp_mine = json.loads(str(theirs.get("fingerprint"))), json.loads(mine["fingerprint"])
        setting_theirs = json.loads(str(theirs["setting"])) if "setting" in theirs else fp_theirs
        setting_mine = fp_mine["setting"]
    except (ValueError, KeyError, TypeError):
        return False

    def items(fp):
        src = fp.get("source") or {}
        return src.get("items_sha256"), src.get("classes")

    if items(fp_theirs) != items(fp_mine) or None in items(fp_mine):
        return False
    common = (set(setting_theirs) & set(setting_mine)) - {"source"}
    return bool(common) and all(_canonical(k, setting_theirs[k]) == _canonical(k, setting_mine[k]) for k in common)


def _canonical(key: str, value):
    """One spelling per field across featx versions (taps, preprocessing and precision were
    written in other forms before the setting record)."""
    if key == "taps":
        pairs = value.items() if isinstance(value, dict) else ((t[0], t[1:]) for t in value)
        return [[name, *spec] for name, spec in pairs]
    if key == "preprocessing":
        return json.loads(value) if isinstance(value, str) else value
    if key == "precision":
        text = str(value).replace("torch.", "")
        return "float32" if text == "None" else text
    return value


def _what_is(path: Path) -> str:
    """What an existing output is, for the sentence that refuses to replace it."""
    if path.is_dir():
        return "is a folder"
    try:
        with open(path, "rb") as fh:
            signature = fh.read(8)
    except OSError as e:
        return f"cannot be read ({cause(e)})"
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT_NAME:
                return "is an HDF5 file but not a featx feature file"
            return "was made with other settings" if f.attrs.get("complete") else "is an unfinished featx file"
    except OSError:
        if signature == b"\x89HDF\r\n\x1a\n":
            return "is a damaged HDF5 file (cut short or overwritten?)"
        return "is not a featx feature file"


# ----------------------------------------------------------------------------- reading


class FeatureStore:
    """Read a featx feature file.

    Example:
        >>> with FeatureStore("train.h5") as fs:
        ...     X, y = fs.features(), fs.labels
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            parts = parts_dir(path)
            if parts.exists():
                raise FeatxError(
                    f"{path} is not complete yet: its extraction stopped part-way "
                    f"({progress_of(parts)}); rerun the same `featx extract` command to finish it."
                )
            raise FeatxError(f"feature file {path} does not exist.")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise FeatxError(f"{path} is not a readable HDF5 file ({e}).") from None
        fmt = self._f.attrs.get("format")
        if fmt != FORMAT_NAME:
            self._f.close()
            raise FeatxError(f"{path} is an HDF5 file but not a featx feature file (format={fmt!r}).")
        version = int(self._f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            self._f.close()
            raise FeatxError(f"{path} uses format version {version}; this featx reads up to {FORMAT_VERSION}. Upgrade featx.")
        if not bool(self._f.attrs.get("complete", False)):
            self._f.close()
            raise FeatxError(f"{path} is marked incomplete; rerun the command that made it.")

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def attrs(self) -> dict:
        out = {}
        for k, v in self._f.attrs.items():
            out[k] = v.item() if isinstance(v, np.generic) else v
        return out

    @property
    def taps(self) -> list[str]:
        return list(self._f["taps"].keys())

    @property
    def default_tap(self) -> str:
        return str(self._f.attrs["default_tap"])

    def tap_info(self, tap: str) -> dict:
        return dict(self.dataset(tap).attrs)

    def __len__(self) -> int:
        return int(self._f["labels"].shape[0])

    def dim(self, tap: str | tuple[str, ...] | None = None) -> int:
        """The width of a tap, or of several combined (their sum)."""
        if isinstance(tap, tuple):
            return sum(self.dim(t) for t in tap)
        return int(self.dataset(tap).shape[1])

    def blocks(self, tap: str | tuple[str, ...] | None) -> tuple[int, ...] | None:
        """The widths of taps combined side by side (a tuple of taps); None for one tap."""
        return tuple(self.dim(t) for t in tap) if isinstance(tap, tuple) else None

    def dataset(self, tap: str | None = None) -> h5py.Dataset:
        """The h5py dataset of a tap (lazy; slice it to read rows)."""
        tap = tap or self.default_tap
        if tap not in self._f["taps"]:
            raise FeatxError(f"{self.path} has no tap {tap!r}; it has: {', '.join(self.taps)}.")
        return self._f["taps"][tap]

    def features(self, tap: str | tuple[str, ...] | None = None,
                 rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Features of one tap as float32 (all rows, or the given rows); of a tuple of taps,
        their features side by side (``featx fit --tap A --tap B``)."""
        if isinstance(tap, tuple):
            return np.concatenate([self.features(t, rows) for t in tap], axis=1)
        ds = self.dataset(tap)
        if rows is None:
            return ds[...].astype(np.float32, copy=False)
        if isinstance(rows, np.ndarray):
            order = np.argsort(rows)
            out = np.empty((len(rows), ds.shape[1]), dtype=np.float32)
            out[order] = ds[np.sort(rows)]  # h5py wants increasing indices
            return out
        return ds[rows].astype(np.float32, copy=False)

    def nonfinite_rows(self, tap: str | None = None, chunk_rows: int = 16384) -> np.ndarray:
        """Indices of the rows whose features of ``tap`` (or of any of a tuple of taps) hold a
        nan or inf (read chunk by chunk)."""
        if isinstance(tap, tuple):
            return functools.reduce(np.union1d, [self.nonfinite_rows(t, chunk_rows) for t in tap])
        ds = self.dataset(tap)
        bad = [s + nonfinite(ds[s:s + chunk_rows]) for s in range(0, ds.shape[0], chunk_rows)]
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)

    def nonfinite_error(self, tap: str, bad: np.ndarray, remedy: str) -> FeatxError:
        """The sentence that refuses rows with nan or inf features: the file, the tap, the
        first row (by id) and how many."""
        first, tap = int(bad[0]), tap_label(tap)
        return FeatxError(f"{self.path}: {len(bad)} of {len(self)} rows have non-finite {tap} features (nan or inf), "
                          f"the first row {first} ({self.ids_at([first])[0]}); extract them again (a float16 file "
                          f"overflows above 65504: use --dtype float32), {remedy}.")

    def ids_at(self, rows) -> list[str]:
        """The ids of some rows (without reading every id)."""
        return [s.decode() if isinstance(s, bytes) else s for s in self._f["ids"][np.sort(np.asarray(rows))]]

    @property
    def feature_dtype(self) -> np.dtype:
        """The precision of the features: float16 for a ``--dtype float16`` file, whose values are
        held as float32 on disk (HALF_STORAGE); else the dataset's own."""
        return np.dtype(self.attrs.get("feature_dtype") or self.dataset().dtype)

    def nbytes(self, tap: str | tuple[str, ...] | None = None) -> int:
        """Bytes of the features of ``tap`` (or of a tuple of taps) as float32."""
        return len(self) * self.dim(tap) * 4

    @property
    def labels(self) -> np.ndarray:
        return self._f["labels"][...]

    def ids_between(self, start: int, end: int) -> list[str]:
        """The ids of rows ``start`` to ``end`` (a chunk, without reading every id)."""
        return [s.decode() if isinstance(s, bytes) else s for s in self._f["ids"][start:end]]

    def labels_between(self, start: int, end: int) -> np.ndarray:
        return self._f["labels"][start:end]

    @property
    def ids(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self._f["ids"][...]]

    @functools.cached_property  # read once: the file is open read-only
    def classes(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self._f["classes"][...]]

    @property
    def failed(self) -> list[tuple[str, str]]:
        ids = self._f["failed/ids"][...]
        reasons = self._f["failed/reasons"][...]
        dec = lambda s: s.decode() if isinstance(s, bytes) else s  # noqa: E731
        return [(dec(a), dec(b)) for a, b in zip(ids, reasons)]

    def provenance(self, tap: str | tuple[str, ...]) -> dict:
        """How one tap's features were made: what a model trained on them needs again.  Of a
        tuple of taps: the file's part, ``tap`` the taps joined by ``+``, ``dim`` their sum,
        and ``taps``, each tap's own (name, layer, pool, dim) in order."""
        if isinstance(tap, tuple):
            each = [self.provenance(t) for t in tap]
            return {**each[0], "tap": tap_label(tap), "layer": None, "pool": None, "dim": sum(p["dim"] for p in each),
                    "taps": [{k: p[k] for k in TAP_KEYS} for p in each]}
        a, ti = self.attrs, self.tap_info(tap)
        return {"backbone": a.get("backbone"), "weights": a.get("weights"), "weights_sha256": a.get("weights_sha256"),
                "weights_path": a.get("weights_path", ""), "weights_seed": a.get("weights_seed"), "tap": tap, "layer": ti.get("layer"),
                "pool": ti.get("pool"), "preprocessing": a.get("preprocessing"), "dim": self.dim(tap),
                "tta": a.get("tta", "none"), "classes": self.classes}


TAP_KEYS = ("tap", "layer", "pool", "dim")  # what a model records of each of its taps


def tap_label(tap: str | tuple[str, ...] | None) -> str | None:
    """How a tap, or a tuple of taps combined, is named to the user: ``A+B``."""
    return "+".join(tap) if isinstance(tap, tuple) else tap


def taps_of(provenance: dict) -> tuple[str, ...]:
    """The stored taps a model was fitted on, in order (one, or several combined)."""
    return tuple(t["tap"] for t in provenance["taps"]) if provenance.get("taps") else (provenance["tap"],)


def nonfinite(X: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``X`` with a nan or inf."""
    return np.flatnonzero(~np.isfinite(X).all(axis=1)) if X.size else np.zeros(0, np.int64)


def check_provenance(expected: dict, got: dict, what: str) -> None:
    """Refuse features made differently from ``expected`` (a model's, or the training file's).

    Backbone, weights, tap, pooling and width must agree, and the class lists must be equal,
    or the label numbers would mean different classes.
    """
    for key in ("backbone", "weights_sha256", "layer", "pool", "dim", "tta"):
        a, b = expected.get(key), got.get(key)
        if a is not None and b is not None and str(a) != str(b):
            raise FeatxError(f"{what} does not match the model: {key} is {b!r} there but the model was "
                             f"trained on {key} {a!r}.")
    for e, g in zip(expected.get("taps") or [], got.get("taps") or []):  # combined taps: each one
        for key in ("layer", "pool", "dim"):
            if str(e[key]) != str(g[key]):
                raise FeatxError(f"{what} does not match the model: tap {e['tap']}'s {key} is {g[key]!r} there but "
                                 f"the model was trained on {key} {e[key]!r}.")
    a, b = expected.get("classes"), got.get("classes")
    if a and b and list(a) != list(b):
        raise FeatxError(f"{what} has classes {list(b)[:5]}... but the model knows {list(a)[:5]}..., so their label "
                         "numbers mean different classes (give every split the same class folders).")


def progress_of(parts: Path) -> str:
    """Work units done and missing in an unfinished run's parts folder."""
    meta = read_parts_header(parts)
    done = {(s.first, s.end) for s in read_shards(parts)}
    n, unit = (meta or {}).get("n_items"), (meta or {}).get("unit_items")
    if n is None or not unit:
        damaged = "; its header.json is missing or damaged" if meta is None else ""
        return f"{sum(e - f for f, e in done)} items done in {len(done)} work units{damaged}"
    units = [(s, min(s + unit, n)) for s in range(0, n, unit)]
    missing = [i for i, u in enumerate(units) if u not in done]
    items = sum(e - f for f, e in units if (f, e) in done)
    text = f"{len(units) - len(missing)} of {len(units)} units done, {items} of {n} items"
    if missing:
        text += "; missing units " + _spans(missing)
    return text


def _spans(numbers: list[int], most: int = 8) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    spans, start = [], None
    for i, v in enumerate(numbers):
        if start is None:
            start = v
        if i + 1 == len(numbers) or numbers[i + 1] != v + 1:
            spans.append(f"{start}-{v}" if v > start else f"{v}")
            start = None
    return ", ".join(spans[:most]) + (f" and {len(spans) - most} more" if len(spans) > most else "")


def info(path: str | os.PathLike) -> dict:
    """A summary of a feature file, or of an unfinished extraction's parts folder."""
    path = Path(path)
    if not path.exists() and parts_dir(path).exists():
        header = read_parts_header(parts_dir(path)) or {}
        return {"path": str(path), "complete": False, "progress": progress_of(parts_dir(path)),
                "backbone": header.get("backbone"), "command": header.get("command"),
                "world_size": header.get("world_size")}
    with FeatureStore(path) as fs:
        a = fs.attrs
        return {
            "path": str(path),
            "complete": bool(a.get("complete")),
            "format": f"{a['format']} v{a['format_version']}",
            "rows": len(fs),
            "failed": len(fs.failed),
            "classes": fs.classes,
            "taps": {t: fs.dim(t) for t in fs.taps},
            "default_tap": fs.default_tap,
            **{k: a.get(k) for k in ("backbone", "weights", "weights_sha256", "weights_seed", "pooling", "preprocessing",
                                     "source", "featx_version", "torch_version", "torchvision_version",
                                     "command", "world_size", "completed")},
        }
