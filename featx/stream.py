"""Rows of feature files as a stream: representative mini-batches under a memory budget.

Out-of-core fitting must not depend on the order of rows in the file: a class-folder tree
is extracted class by class, so contiguous chunks hold one or two classes each.
:class:`RowStream` cuts the files into small blocks of rows (never across an HDF5 chunk,
so each block is one contiguous read), visits the blocks in a seeded random order that
changes every epoch, gathers a buffer of blocks from all over the files, shuffles the
buffer's rows and cuts it into mini-batches: with blocks of 32 rows, a mini-batch of 1,024
rows comes from about 30 places in the file.  Only a buffer (and the next one, read by a background thread while the
current one trains) is ever in memory.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from featx.store import FeatureStore


@dataclass
class Part:
    """Rows of one feature file that belong to the stream."""

    store: FeatureStore
    tap: str | tuple[str, ...]  # a tuple: several taps side by side
    rows: np.ndarray | None = None  # bool mask over the file's rows; None: all rows

    def mask(self) -> np.ndarray:
        return np.ones(len(self.store), bool) if self.rows is None else self.rows


class RowStream:
    """Mini-batches ``(X, y)`` of the selected rows of one or more feature files.

    Args:
        parts: the files and the rows of each that belong to the stream.
        buffer_rows: rows gathered per buffer (the memory bound: two buffers at a time).
        batch_size: rows per mini-batch.
        block_rows: rows per read; None: ``buffer_rows / 64`` (so a buffer gathers at least
            64 places of the files), at least 32 and at most an HDF5 chunk.
        seed: the block order of epoch ``e`` is seeded by ``(seed, e)``.
        transform: applied to each buffer's rows (the fitted scaler, a kernel map).
    """

    def __init__(self, parts: list[Part], buffer_rows: int, batch_size: int = 512, seed: int = 0,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None, block_rows: int | None = None):
        self.parts, self.batch_size, self.seed, self.transform = parts, batch_size, seed, transform
        self._masks = [part.mask() for part in parts]
        self._labels = [part.store.labels for part in parts]  # small: 8 bytes a row, read once
        self._datasets = [[part.store.dataset(t) for t in (part.tap if isinstance(part.tap, tuple) else (part.tap,))]
                          for part in parts]
        self.blocks: list[tuple[int, int, int]] = []  # (part, first row, end row)
        for p, sets in enumerate(self._datasets):
            chunk = min(ds.chunks[0] if ds.chunks else len(ds) for ds in sets)
            step = block_rows or max(32, buffer_rows // 64)
            step = max(1, min(step, chunk))  # blocks tile each chunk, none straddles two
            mask = self._masks[p]
            self.blocks += [(p, s, min(s + step, c + chunk, len(mask)))
                            for c in range(0, len(mask), chunk) for s in range(c, min(c + chunk, len(mask)), step)
                            if mask[s:min(s + step, c + chunk)].any()]
        rows_per_block = max(1, max((e - s for _, s, e in self.blocks), default=1))
        self.blocks_per_buffer = max(1, buffer_rows // rows_per_block)
        self.labels = np.concatenate([lab[m] for lab, m in zip(self._labels, self._masks)])
        self.n_features = parts[0].store.dim(parts[0].tap)

    def with_transform(self, transform) -> "RowStream":
        out = RowStream.__new__(RowStream)
        out.__dict__.update(self.__dict__, transform=transform)
        return out

    def _read(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for p, s, e in sorted(blocks):  # file order within a buffer: sequential reads
            keep = self._masks[p][s:e]
            taps = [ds[s:e].astype(np.float32, copy=False) for ds in self._datasets[p]]
            x = taps[0] if len(taps) == 1 else np.concatenate(taps, axis=1)
            xs.append(x if keep.all() else x[keep])
            ys.append(self._labels[p][s:e][keep])
        X, y = np.concatenate(xs), np.concatenate(ys)
        return (self.transform(X) if self.transform else X).astype(np.float32, copy=False), y

    def buffers(self, epoch: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Buffers of rows: in file order (``epoch`` None) or from blocks in a seeded random order."""
        order = list(range(len(self.blocks)))
        if epoch is not None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks)).tolist()
        groups = [[self.blocks[i] for i in order[g:g + self.blocks_per_buffer]]
                  for g in range(0, len(order), self.blocks_per_buffer)]
        return prefetch(self._read(g) for g in groups)

    def __call__(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shuffled mini-batches covering every selected row once, all full but the last
        (the rows a buffer leaves over join the next buffer's)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        X_left, y_left = None, None
        for X, y in self.buffers(epoch):
            order = rng.permutation(len(y))
            X, y = X[order], y[order]
            if X_left is not None:
                X, y = np.concatenate([X_left, X]), np.concatenate([y_left, y])
            full = len(y) // self.batch_size * self.batch_size
            for s in range(0, full, self.batch_size):
                yield X[s:s + self.batch_size], y[s:s + self.batch_size]
            X_left, y_left = X[full:], y[full:]
        if y_left is not None and len(y_left):
            yield X_left, y_left

    def sequential(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every selected row once, in file order, a buffer at a time (statistics, evaluation)."""
        return self.buffers(None)


def prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate ``items`` in a background thread, ``depth`` items ahead of the consumer.

    Reading the next buffer overlaps with training on the current one: HDF5 reads and
    numpy release the GIL for their copies, and torch releases it while it computes.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
            return
        q.put(done)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
