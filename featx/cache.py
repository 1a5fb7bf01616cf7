"""A content-addressed feature cache: each image's features are computed once per setting.

The key of an entry is (the sha256 of the image's bytes, the digest of one tap's
*setting*: everything that decides its vector).  A file renamed, moved, or listed in
another CSV split keeps its key; a change to any setting (weights, size, pooling,
precision, dtype, featx's feature code...) makes another key.  So a hit gives exactly the
vector that a miss would compute, and where a row came from is invisible in the result.

Storage: one SQLite database in WAL mode (``index.sqlite``), vectors as BLOBs beside their
key, a CRC32 of each vector, and the time of last use (for pruning the least recently
used).  Why SQLite: it is in Python's standard library; a transaction is atomic, so a
process killed at any moment (SIGKILL included) leaves either a whole entry or none; in
WAL mode readers never block and writers hold the lock only for the few milliseconds of a
batch's insert, so torchrun ranks on one node share a cache.  SQLite's locks need a local
filesystem (or one with working POSIX locks): give each node its own cache in multi-node
runs.  A cache that cannot be read is reported in one sentence and left alone; the run
goes on without it and computes every vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when a change to featx's decoding, preprocessing or pooling code changes the vectors
# it computes: every older entry then misses.
FEATURE_CODE_VERSION = 2  # 2: libjpeg-turbo decoding and resizing on uint8 tensors (featx.decode)
DEFAULT_DIR = Path("cache") / "features"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    image   TEXT NOT NULL,      -- sha256 of the image's bytes (of its pixels for torchvision data sets)
    setting TEXT NOT NULL,      -- digest of everything that decides the vector (see settings)
    dtype   TEXT NOT NULL,
    dim     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    crc     INTEGER NOT NULL,   -- crc32 of data: a damaged vector is a miss, never a wrong row
    used    REAL NOT NULL,      -- last use (unix time): prune evicts the least recently used
    PRIMARY KEY (image, setting)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (
    setting TEXT PRIMARY KEY,
    description TEXT NOT NULL,  -- the fingerprint as JSON
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


def default_location() -> Path:
    """``$FEATX_CACHE``, else ``cache/features/`` under the working directory."""
    return Path(os.environ.get("FEATX_CACHE") or DEFAULT_DIR)


def setting_digest(description: dict) -> str:
    text = json.dumps({"featx_feature_code": FEATURE_CODE_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class FeatureCache:
    """The cache at ``root`` (created on first use).

    Args:
        root: a folder; the database is ``root/index.sqlite``.
        timeout: seconds to wait for another process's write lock.
    """

    def __init__(self, root: str | os.PathLike, timeout: float = 120.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "index.sqlite"
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        # Switching a new database to WAL takes an exclusive lock that SQLite does not wait
        # for: processes opening a new cache at once retry (the schema is idempotent).
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic, durable up to a power cut
                self._db.executescript(_SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "FeatureCache | None":
        """The cache, or None (with one warning) when it cannot be opened or is damaged."""
        root = Path(root) if root else default_location()
        try:
            cache = cls(root)
            if cache._db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            return cache
        except (sqlite3.Error, OSError) as e:
            warnings.warn(f"the feature cache at {root} cannot be used ({e}); computing every vector without it "
                          f"(remove {root} to start a new cache).", stacklevel=2)
            return None

    def close(self) -> None:
        self._db.close()

    # -- entries ----------------------------------------------------------------------------

    def register(self, setting: str, description: dict) -> None:
        self._db.execute("INSERT OR IGNORE INTO settings(setting, description, created) VALUES (?, ?, ?)",
                         (setting, json.dumps(description, sort_keys=True), time.time()))

    def has(self, images: list[str], setting: str) -> set[str]:
        """Which of ``images`` have a vector for ``setting`` (nothing read, nothing recorded)."""
        out: set[str] = set()
        for s in range(0, len(images), 500):
            chunk = images[s:s + 500]
            out.update(r[0] for r in self._db.execute(
                f"SELECT image FROM vectors WHERE setting = ? AND image IN ({','.join('?' * len(chunk))})",
                [setting, *chunk]))
        return out

    def get(self, images: list[str], setting: str) -> dict[str, np.ndarray]:
        """The cached vectors of ``images`` for one setting (misses are absent)."""
        out, bad = {}, []
        for s in range(0, len(images), 500):  # SQLite's limit on bound parameters
            chunk = images[s:s + 500]
            rows = self._db.execute(
                f"SELECT image, dtype, dim, data, crc FROM vectors WHERE setting = ? AND image IN "
                f"({','.join('?' * len(chunk))})", [setting, *chunk]).fetchall()
            for image, dtype, dim, data, crc in rows:
                if zlib.crc32(data) != crc or len(data) != dim * np.dtype(dtype).itemsize:
                    bad.append(image)
                    continue
                out[image] = np.frombuffer(data, dtype=dtype)
        now = time.time()
        with self._db:  # one short transaction: last use, hit and miss counts, damaged entries
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE vectors SET used = ? WHERE image = ? AND setting = ?",
                                 [(now, i, setting) for i in out])
            self._db.executemany("DELETE FROM vectors WHERE image = ? AND setting = ?", [(i, setting) for i in bad])
            self._db.execute("UPDATE settings SET hits = hits + ?, misses = misses + ? WHERE setting = ?",
                             (len(out), len(images) - len(out), setting))
        return out

    def put(self, vectors: dict[str, np.ndarray], setting: str) -> None:
        """Add vectors (image -> 1-D array) in one transaction: all of them or none."""
        now = time.time()
        rows = []
        for image, v in vectors.items():
            data = np.ascontiguousarray(v).tobytes()
            rows.append((image, setting, str(v.dtype), int(v.shape[0]), data, zlib.crc32(data), now))
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    # -- housekeeping -------------------------------------------------------------------------

    def size(self) -> int:
        """Bytes on disk (database and its write-ahead log)."""
        return sum(p.stat().st_size for p in self.root.glob("index.sqlite*") if p.is_file())

    def info(self) -> dict:
        n = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM vectors").fetchone()
        settings = []
        for setting, desc, hits, misses in self._db.execute(
                "SELECT setting, description, hits, misses FROM settings ORDER BY created"):
            count = self._db.execute("SELECT COUNT(*) FROM vectors WHERE setting = ?", (setting,)).fetchone()[0]
            lookups = hits + misses
            settings.append({"setting": setting, "entries": count, "hits": hits, "misses": misses,
                             "hit_rate": hits / lookups if lookups else None, **json.loads(desc)})
        return {"path": str(self.root), "entries": n[0], "vector_bytes": n[1], "bytes_on_disk": self.size(),
                "settings": settings}

    def prune(self, max_bytes: int) -> int:
        """Evict the least recently used entries until the cache is at most ``max_bytes``; returns how many."""
        removed = 0
        self._compact()
        while self.size() > max_bytes:
            n = self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            if n == 0:
                break
            per_entry = self.size() / n  # after compaction: what an entry costs on disk
            k = min(n, max(1, int(np.ceil((self.size() - max_bytes) / per_entry))))
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                removed += self._db.execute(
                    "DELETE FROM vectors WHERE (image, setting) IN "
                    "(SELECT image, setting FROM vectors ORDER BY used LIMIT ?)", (k,)).rowcount
            self._compact()
        return removed

    def _compact(self) -> None:
        """Fold the write-ahead log into the database and give free pages back to the disk."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.execute("VACUUM")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
