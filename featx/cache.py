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

import errno
import json
import os
import shutil
import sqlite3
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from featx.files import cause

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
CREATE TABLE IF NOT EXISTS made_weights (
    made    TEXT PRIMARY KEY,   -- what makes a seeded random network: backbone, seed, torch and featx versions
    sha256  TEXT NOT NULL       -- the digest of the parameters it makes (weights_sha256)
);
"""


def default_location() -> Path:
    """``$FEATX_CACHE``, else ``cache/features/`` under the working directory."""
    return Path(os.environ.get("FEATX_CACHE") or DEFAULT_DIR)


# A featx process holds the write lock for the few milliseconds of one unit's insert; a
# lock held longer belongs to something else (a crashed tool, an open sqlite3 shell): wait
# this long for it, saying so at once, then go on without the cache.
LOCK_WAIT = 30.0
PRUNE_BATCH = 2000  # entries evicted per transaction


class CacheLocked(sqlite3.OperationalError):
    """Another process held the cache's lock for longer than the wait allows."""


class FeatureCache:
    """The cache at ``root`` (created on first use).

    Args:
        root: a folder; the database is ``root/index.sqlite``.
        lock_wait: seconds to wait for a lock another process holds (after one second,
            ``log`` says that it is waiting, and on what).
        log: called with that sentence (default: a warning).
        create: make the cache when there is none (False: raise FileNotFoundError).
    """

    def __init__(self, root: str | os.PathLike, lock_wait: float = LOCK_WAIT, log=None, create: bool = True):
        self.root = Path(root)
        self.path = self.root / "index.sqlite"
        self.lock_wait = lock_wait
        self.log = log or (lambda text: warnings.warn(text, stacklevel=4))
        if not create and not self.path.is_file():
            raise FileNotFoundError(errno.ENOENT, "no feature cache", str(self.path))
        self.root.mkdir(parents=True, exist_ok=True)
        # the busy handler waits up to a second: longer than any featx process holds a lock
        self._db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        # Switching a new database to WAL takes an exclusive lock that SQLite does not wait
        # for: processes opening a new cache at once retry (the schema is idempotent).
        self._waiting(self._setup)

    def _setup(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic, durable up to a power cut
        # no zeroing of freed pages (Debian's SQLite does it by default): features are not
        # secrets, and zeroing writes every evicted page into the log (prune on a full disk)
        self._db.execute("PRAGMA secure_delete=FAST")
        self._db.executescript(_SCHEMA)

    def _waiting(self, op, *args):
        """``op(*args)``, retried while another process holds the lock, for at most
        ``lock_wait`` seconds; says at once that it waits."""
        deadline = None
        while True:
            try:
                return op(*args)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.lock_wait
                    self.log(f"the feature cache {self.path} is locked by another process; waiting up to "
                             f"{self.lock_wait:.0f} s for it")
                elif now >= deadline:
                    raise CacheLocked(f"another process held its lock for more than {self.lock_wait:.0f} s") from None
                time.sleep(0.05)

    @classmethod
    def open(cls, root: str | os.PathLike | None = None, create: bool = True, log=None) -> "FeatureCache | None":
        """The cache, or None (with one warning saying why) when it cannot be used."""
        root = Path(root) if root else default_location()
        try:
            cache = cls(root, log=log, create=create)
        except FileNotFoundError:
            if not create:
                return None
            why = _why_unusable(root, None)
        except (sqlite3.Error, OSError) as e:
            why = _why_unusable(root, e)
        else:
            try:
                if cache._db.execute("PRAGMA quick_check").fetchone()[0] == "ok":
                    return cache
                why = _why_unusable(root, sqlite3.DatabaseError("quick_check failed"))
            except sqlite3.Error as e:
                why = _why_unusable(root, e)
            cache.close()
        warnings.warn(f"the feature cache at {root} cannot be used ({why}); computing every vector without it.",
                      stacklevel=2)
        return None

    def close(self) -> None:
        self._db.close()

    # -- entries ----------------------------------------------------------------------------

    def register(self, setting: str, description: dict) -> None:
        self._waiting(self._db.execute, "INSERT OR IGNORE INTO settings(setting, description, created) "
                      "VALUES (?, ?, ?)", (setting, json.dumps(description, sort_keys=True), time.time()))

    def made_weights(self, made: str) -> str | None:
        """The parameter digest recorded for a seeded random network (``made``: what makes it)."""
        row = self._db.execute("SELECT sha256 FROM made_weights WHERE made = ?", (made,)).fetchone()
        return row[0] if row else None

    def remember_weights(self, made: str, sha256: str) -> None:
        self._waiting(self._db.execute, "INSERT OR REPLACE INTO made_weights VALUES (?, ?)", (made, sha256))

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

        def record():  # one short transaction: last use, hit and miss counts, damaged entries
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("UPDATE vectors SET used = ? WHERE image = ? AND setting = ?",
                                     [(now, i, setting) for i in out])
                self._db.executemany("DELETE FROM vectors WHERE image = ? AND setting = ?",
                                     [(i, setting) for i in bad])
                self._db.execute("UPDATE settings SET hits = hits + ?, misses = misses + ? WHERE setting = ?",
                                 (len(out), len(images) - len(out), setting))

        self._waiting(record)
        return out

    def put(self, vectors: dict[str, np.ndarray], setting: str) -> None:
        """Add vectors (image -> 1-D array) in one transaction: all of them or none."""
        now = time.time()
        rows = []
        for image, v in vectors.items():
            data = np.ascontiguousarray(v).tobytes()
            rows.append((image, setting, str(v.dtype), int(v.shape[0]), data, zlib.crc32(data), now))
        def insert():
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

        self._waiting(insert)

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

    def live_bytes(self) -> int:
        """Bytes the entries take in the database (its pages in use) and its write-ahead log."""
        page_size, pages, free = (self._db.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_size", "page_count", "freelist_count"))
        wal = self.root / "index.sqlite-wal"
        return (pages - free) * page_size + (wal.stat().st_size if wal.is_file() else 0)

    def prune(self, max_bytes: int) -> tuple[int, bool]:
        """Evict the least recently used entries until they take at most ``max_bytes``.

        Entries are deleted first (SQLite reuses their pages); then the file is compacted
        (VACUUM) to give the space back to the disk, but only when the disk has room for
        the copy that compaction writes: a full disk can always be pruned.  Returns how
        many entries were removed and whether the file was compacted.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        removed = 0
        self._waiting(self._db.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
        while self.live_bytes() > max_bytes:
            n = self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
            if n == 0:
                break
            per_entry = self.live_bytes() / n  # what an entry costs in pages
            # at most PRUNE_BATCH entries a transaction, the log folded back after each: the
            # log stays small, so pruning needs next to no free space
            k = min(n, PRUNE_BATCH, max(1, int(np.ceil((self.live_bytes() - max_bytes) / per_entry))))

            def delete():
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    return self._db.execute("DELETE FROM vectors WHERE (image, setting) IN "
                                            "(SELECT image, setting FROM vectors ORDER BY used LIMIT ?)", (k,)).rowcount

            removed += self._waiting(delete)
            self._waiting(self._db.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
        return removed, self._compact()

    def _compact(self) -> bool:
        """Give free pages back to the disk (VACUUM writes a copy of the live pages through
        the write-ahead log: it needs about twice their size free); False when there is no room."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        if free < 2 * self.live_bytes() + (1 << 20):
            return False
        try:
            self._waiting(self._db.execute, "VACUUM")
        except sqlite3.OperationalError as e:  # the disk filled up meanwhile: the pruned pages stay reusable
            if "full" not in str(e):
                raise
            return False
        finally:
            self._waiting(self._db.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
        return True


def _why_unusable(root: Path, e: BaseException | None) -> str:
    """Why the cache at ``root`` cannot be used, and what to do: never advice to remove a
    good cache because of a folder problem."""
    if root.exists() and not root.is_dir():
        return f"{root} is a file, not a folder (FEATX_CACHE names the cache's folder)"
    if isinstance(e, OSError):
        return cause(e)
    text = str(e)
    if isinstance(e, CacheLocked):
        return text
    if "readonly" in text or "unable to open" in text or not os.access(root, os.W_OK):
        return "featx cannot write there (a read-only folder or file?)"
    return (f"it is damaged: {text}; remove {root} to start a new cache, the feature files made with it are not "
            "affected")


class CacheLookup:
    """The feature cache as the extraction runner uses it: each unit's content keys,
    lookups and additions.  Any error of the cache turns it off for the rest of the run,
    with one warning: the run goes on and computes what the cache would have given.

    Args:
        cache: the cache (None: every image is a miss).
        key_of: item -> sha256 of its content (None when unreadable).
        settings: stored tap -> (its setting's digest, the setting itself).
    """

    def __init__(self, cache: FeatureCache | None, key_of: Callable[[int], str | None] | None = None,
                 settings: dict[str, tuple[str, dict]] | None = None):
        self.cache, self.key_of = cache, key_of
        self.settings = {}
        for tap, (digest, description) in (settings or {}).items() if cache is not None else ():
            self.settings[tap] = digest
            self._guard(cache.register, digest, description)
        self.pool = ThreadPoolExecutor(4) if cache is not None else None  # hashing releases the GIL
        self.keys: dict[int, list] = {}  # unit start -> content keys, when counted ahead

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except sqlite3.Error as e:
            warnings.warn(f"the feature cache at {self.cache.root} failed ({e}); going on without it.", stacklevel=3)
            self.cache = None
            return None

    def _keys(self, unit: range) -> list:
        keys = self.keys.pop(unit.start, None)
        return keys if keys is not None else list(self.pool.map(self.key_of, unit))

    def count_todo(self, units: list[range]) -> int:
        """How many of the units' images the network must see (a first pass over the keys)."""
        total = sum(len(u) for u in units)
        if self.cache is None:
            return total
        done = 0
        for unit in units:
            keys = self.keys[unit.start] = self._keys(unit)
            known = [k for k in keys if k is not None]
            present = [self._guard(self.cache.has, known, s) if self.cache is not None else None
                       for s in self.settings.values()]
            if any(p is None for p in present):
                return total
            done += sum(1 for k in keys if k is not None and all(k in p for p in present))
        return total - done

    def __call__(self, unit: range) -> tuple[list, dict]:
        """The unit's content keys, and per tap the cached vectors of its items."""
        if self.cache is None:
            return [], {}
        keys = self._keys(unit)
        known = [k for k in keys if k is not None]
        hits = {}
        for tap, setting in self.settings.items():
            found = self._guard(self.cache.get, known, setting) if self.cache is not None else None
            if found is None:
                return keys, {}
            hits[tap] = {i: found[k] for i, k in zip(unit, keys) if k is not None and k in found}
        return keys, hits

    def store(self, unit: range, keys: list, hits: dict, computed: dict) -> None:
        """Add the vectors the network made for the unit's items (never a cached one again)."""
        if self.cache is None or not keys:
            return
        for tap, setting in self.settings.items():
            new = {keys[i - unit.start]: v[tap] for i, v in computed.items()
                   if keys[i - unit.start] is not None and tap in v and i not in hits.get(tap, {})}
            if new:
                self._guard(self.cache.put, new, setting)
            if self.cache is None:
                return

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
