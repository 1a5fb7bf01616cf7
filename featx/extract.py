"""The extraction runner: work units -> cache lookup -> decode -> forward -> writer.

:func:`extract` cuts the source's items into work units, takes this process's share of
them, and hands each finished unit to a :class:`featx.store.StoreWriter`, which publishes
it and, when every unit is done, assembles the file.  :func:`compute` is the one loop from
images to vectors, used by extraction and by prediction: the feature cache is asked first
(:class:`featx.cache.CacheLookup`), the missing images are decoded in DataLoader workers and
go through the network in full batches, and each unit's rows come out, in order, as soon as
all of its images are done.  The network is the extractor's (:mod:`featx.extractor`); under
torchrun the ranks agree at start-up (:mod:`featx.distributed`).
"""

from __future__ import annotations

import bisect
import collections
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from featx.cache import CacheLookup, FeatureCache
from featx.decode import Decoded, collate
from featx.distributed import World, agree, barrier, broadcast, cpu_share, device_spec, from_env, session
from featx.errors import FeatxError
from featx.extractor import ExtractConfig, FeatureExtractor, cache_folder
from featx.files import check_output, os_error
from featx import adapters
from featx.sources import Source, open_source
from featx.store import FeatureStore, StoreWriter

__all__ = ["ExtractConfig", "ExtractResult", "compute", "extract", "extract_data", "unit_size"]


@dataclass
class ExtractResult:
    out: str
    n_items: int
    n_rows: int  # -1 while other processes still have units to do
    failed: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0  # items already published when this run started
    seconds: float = 0.0
    already_complete: bool = False
    units_done: int = 0  # work units this process extracted
    cache_hits: int = 0  # rows whose features came from the feature cache (all processes)
    compiled: bool = False  # this process ran the compiled graph (--compile)


MAX_UNIT_ITEMS = 4096  # a killed process loses at most this much work
MIN_UNITS = 64  # so that a small job still spreads over many processes


def unit_size(n_items: int, batch_size: int, requested: int | None = None) -> int:
    """Items per work unit: ``requested``, or n/64 up to 4,096; a multiple of the batch size.

    It depends on the job alone (never on the number of processes), so any world size
    cuts the same units.
    """
    unit = requested or min(MAX_UNIT_ITEMS, -(-n_items // MIN_UNITS))
    return max(batch_size, -(-unit // batch_size) * batch_size)


class _JobProgress:
    """One progress bar for the whole job: this process's batches, and on rank 0 of a
    torchrun job also the other ranks' published shards (read from the parts folder)."""

    def __init__(self, writer: StoreWriter, world: World, done: int, enabled: bool | None, label: str):
        self.writer, self.world, self.mine = writer, world, 0
        self.others = world.collective and world.is_main
        self.bar = tqdm(total=writer.n_items, initial=done, unit="img", leave=False, desc=label,
                        disable=(None if enabled is None else not enabled) if world.is_main else True)
        self.start, self.polled = done, 0.0

    def __call__(self, k: int) -> None:
        self.mine += k
        if self.others and time.monotonic() - self.polled > 2:  # every shard of every rank
            self.polled = time.monotonic()
            published = sum(e - f for f, e in self.writer.done_ranges())
            self.bar.n = max(self.bar.n, published)
            self.bar.refresh()
        else:
            self.bar.update(k)

    def close(self) -> None:
        self.bar.close()


def extract(source: Source, out: str | os.PathLike, config: ExtractConfig, overwrite: bool = False,
            finalize: bool = True, unit_items: int | None = None, world: World | None = None,
            log=None) -> ExtractResult:
    """Extract features of every item of ``source`` into the feature file ``out``.

    The items are cut into work units of ``unit_items`` (rounded up to a multiple of the
    batch size).  Each process takes the units whose index modulo the number of processes
    is its rank, skips units already published (a resumed run), and publishes each unit it
    does as a shard.  Under torchrun (or with ``world``), every rank runs this same call;
    with torchrun, rank 0 assembles the file after a barrier; with a hand-made ``world``
    (no process group), the process that finds every unit published assembles it.  A
    second process with the same share of the same job (the same command started twice)
    waits for the first, then finds its work done.

    Args:
        source: the images.
        out: path of the .h5 file.
        config: backbone, taps, pooling, preprocessing, engine settings.
        overwrite: replace an output (or an unfinished run) made with other settings.
        finalize: assemble the HDF5 file when every unit is done.
        unit_items: items per work unit (default: :func:`unit_size`); part of the fingerprint.
        world: this process's rank among several (default: torchrun's environment, or one).
        log: called with a sentence when this process has to wait for another
            (default: a warning).

    With ``config.cache`` (on by default), each image is looked up in the feature cache
    by its content and settings first: hits skip decoding and the network, misses are added;
    the file is the same either way.
    """
    t0 = time.perf_counter()
    log = log or (lambda text: warnings.warn(text, stacklevel=3))
    if len(source) == 0:
        raise FeatxError("the source has no images.")
    with session(world) as world:
        writer, extractor = _start(source, out, config, overwrite, unit_items, world)
        if writer.already_complete:
            n_rows, _, _ = _summary_of(out)
            return ExtractResult(str(out), len(source), n_rows, [], len(source), 0.0, True)
        with writer.claim(world.rank, world.size, log) as claimed:
            # a process that waited for another may find the work done, or the file made
            finished = not claimed
            mine = [] if finished else writer.pending(world.rank, world.size)
            done = writer.n_items if finished else sum(e - f for f, e in writer.done_ranges())
            if finished and not world.collective:
                n_rows, _, _ = _summary_of(out)
                return ExtractResult(str(out), len(source), n_rows, [], len(source), 0.0, True)
            bar = _JobProgress(writer, world, done, config.progress, f"extract {config.backbone}")
            cache = None
            if config.cache and mine:
                cache = FeatureCache.open(cache_folder(config))
                if cache is not None:
                    extractor.remember_weights(cache)
            try:
                failed, hits = _run_units(source, extractor, writer, mine, cache, bar)
            finally:
                bar.close()
                if cache is not None:
                    cache.close()
        n_rows = -1
        if finalize:
            barrier(world)  # torchrun: every rank has published its units
            if (world.is_main or not world.collective) and not writer.missing():
                writer.finalize(source.classes, extractor.default_tap)
            barrier(world)  # the other ranks return once the file is there
            if writer.output_complete():
                n_rows, failed, hits = _summary_of(out)
        return ExtractResult(str(out), len(source), n_rows, failed, done, time.perf_counter() - t0,
                             units_done=len(mine), cache_hits=hits, compiled=extractor.compiled is not None)


def extract_data(data: str, out: str | os.PathLike, config: ExtractConfig, split: str | None = None,
                 root: str | None = None, overwrite: bool = False, unit_items: int | None = None,
                 log=None) -> ExtractResult:
    """``featx extract DATA``: open DATA (a folder, a CSV/TSV list or ``torchvision:NAME``;
    split folders as every command reads them, said through ``log``) and :func:`extract` it."""
    adapters.backbone(config.backbone)  # checked before scanning a possibly large folder
    source = open_source(data, split=split, root=root)
    if source.note and log and from_env().is_main:
        log(source.note)
    return extract(source, out, config, overwrite=overwrite, unit_items=unit_items, log=log)


class _Plan:
    """The DataLoader's batches: the items the network must see, in full batches across units.

    Unit by unit, in order, the cache (when there is one) is asked for the unit's images
    first; the items with at least one tap missing join one queue, cut into batches of the
    batch size as it fills (without a cache, exactly each unit's batches, the units being
    multiples of the batch size).  So a rerun with a few misses scattered over many units
    computes full batches, and only the job's last batch is padded.  ``done`` lists, as the
    units are looked up, each unit with the number of queued items up to its end: the
    consumer has a unit's rows once that many items went through the network.
    """

    def __init__(self, units: list[range], batch_size: int, lookup: CacheLookup):
        self.units, self.batch_size, self.lookup = units, batch_size, lookup
        self.done: collections.deque = collections.deque()  # (unit, items queued up to its end)
        self.cached: dict[int, tuple[list, dict]] = {}  # unit -> (content keys, tap -> {item: vector})

    def __iter__(self):
        queue, queued = [], 0
        for u, unit in enumerate(self.units):
            keys, hits = self.lookup(unit)
            self.cached[u] = (keys, hits)
            todo = [i for i in unit if not hits or any(i not in h for h in hits.values())]
            queue += todo
            queued += len(todo)
            self.done.append((u, queued))
            while len(queue) >= self.batch_size:
                yield queue[:self.batch_size]
                queue = queue[self.batch_size:]
        if queue:
            yield queue


@dataclass
class UnitRows:
    """One work unit's result, as :func:`compute` yields it."""

    unit: range
    rows: dict[int, dict[str, np.ndarray]]  # item -> tap -> vector, for the items with a row
    failed: dict[int, str]  # item -> why it has no row
    computed: dict[int, dict[str, np.ndarray]]  # the vectors the network made (the others were cached)
    keys: list  # the items' content keys (with a cache)
    hits: dict  # tap -> {item: cached vector}


NONFINITE = "the network's output is not finite (nan or inf)"


def compute(source: Source, extractor: FeatureExtractor, units: list[range],
            lookup: CacheLookup | None = None) -> Iterator[UnitRows]:
    """The runner's loop, from images to vectors: each unit's rows, in unit order, as soon
    as all of its images are done.

    ``lookup`` (the feature cache) is asked for each unit's images first; the images with a
    tap missing are decoded in DataLoader workers (uint8 tensors cross the process
    boundary) while this process runs the network on full batches of them, asking only for
    the missing taps.  An image that cannot be decoded, or whose vectors come out nan or
    inf, is a failure (with ``on_error="fail"``, the error).  ``units`` are in item order.
    """
    lookup = lookup or CacheLookup(None)
    c = extractor.config
    todo = lookup.count_todo(units)  # compile for the images the network must see, if any
    if todo:
        extractor.prepare(todo)
    plan = _Plan(units, c.batch_size, lookup)
    starts = [u.start for u in units]  # in order: the unit of item i is the last one starting at or before it
    computed: dict[int, dict] = {}  # item -> tap -> vector, until its unit is complete
    failed: dict[int, str] = {}
    dtype, seen = np.dtype(c.dtype), 0

    def complete():
        while plan.done and plan.done[0][1] <= seen:
            u = plan.done.popleft()[0]
            unit, (keys, hits) = units[u], plan.cached.pop(u)
            mine = {i: computed.pop(i) for i in unit if i in computed}
            bad = {i: failed.pop(i) for i in unit if i in failed}
            rows = {i: {t: mine[i][t] if i in mine and t in mine[i] else hits[t][i] for t in extractor.taps}
                    for i in unit if i not in bad}
            yield UnitRows(unit, rows, bad, mine, keys, hits)

    loader = _loader(source, extractor, plan, sum(len(u) for u in units)) if units else []
    for x, good, bad in loader:
        _check_errors(source, bad, c)
        n = len(good) + len(bad)
        if x is not None:
            hits_of = [plan.cached[bisect.bisect_right(starts, i) - 1][1] for i in good]
            missing = [t for t in extractor.taps if any(i not in h.get(t, {}) for i, h in zip(good, hits_of))]
            feats = extractor(x, missing)
            for k, i in enumerate(good):
                row = {t: v[k] for t, v in feats.items()}
                if all(np.isfinite(v.astype(dtype)).all() for v in row.values()):
                    computed[i] = row
                else:  # a row of nan or inf would break every tool downstream: a recorded failure
                    bad.append((i, NONFINITE + (" as float16 (above 65504?)" if dtype == np.float16 else "")))
            _check_errors(source, bad, c)
        failed.update(bad)
        seen += n
        yield from complete()
    yield from complete()  # units the cache answered whole, after the last batch


def _workers(config: ExtractConfig, n: int, world: World = World()) -> int:
    if config.workers is not None:
        return config.workers
    if n <= 2 * config.batch_size:
        return 0  # starting processes costs more than it saves
    return min(cpu_share(world), 8)  # the processes on a node share its cores


def _loader(source: Source, extractor: FeatureExtractor, batch_sampler, n_items: int):
    """Decode in DataLoader workers (uint8 tensors cross the process boundary) the batches
    the sampler gives (read as the loader goes)."""
    c = extractor.config
    n_workers = _workers(c, n_items, extractor.world)
    return torch.utils.data.DataLoader(
        Decoded(source, extractor.pre, c.max_pixels), batch_sampler=batch_sampler, num_workers=n_workers,
        collate_fn=collate, pin_memory=extractor.device.type == "cuda", prefetch_factor=4 if n_workers else None,
        generator=torch.Generator(),  # the workers' base seed (unused: decoding draws nothing) not from the global one
    )


def _check_errors(source: Source, bad, config: ExtractConfig) -> None:
    if bad and config.on_error == "fail":
        i, err = bad[0]
        what = "cannot extract" if err.startswith(NONFINITE) else "cannot decode"
        raise FeatxError(f"{what} {source.ids[i]}: {err} (--on-error skip records it and goes on).")


def _run_units(source: Source, extractor: FeatureExtractor, writer: StoreWriter, units: list[range],
               cache: FeatureCache | None, progress) -> tuple[list, int]:
    """Extract ``units`` (asking the cache first) and hand each finished unit to the writer
    (and its new vectors to the cache)."""
    lookup = CacheLookup(cache, source.content_key,
                         {t: (extractor.setting.tap_digest(t), extractor.setting.tap(t)) for t in extractor.taps})
    failed, hits = [], 0
    try:
        for r in compute(source, extractor, units, lookup):
            good = sorted(r.rows)
            taps = {t: np.stack([r.rows[i][t] for i in good]) for t in extractor.taps} if good else None
            n_hits = sum(1 for i in good if i not in r.computed)
            writer.add(r.unit.start, r.unit.stop, taps, source.labels[good], [source.ids[i] for i in good],
                       [source.ids[i] for i in sorted(r.failed)], [r.failed[i] for i in sorted(r.failed)],
                       cache_hits=n_hits)
            lookup.store(r.unit, r.keys, r.hits, r.computed)
            failed += [(source.ids[i], e) for i, e in sorted(r.failed.items())]
            hits += n_hits
            progress(len(r.unit))
    finally:
        lookup.close()
    return failed, hits


def _start(source: Source, out, config: ExtractConfig, overwrite: bool, unit_items: int | None, world: World):
    """Set up this process; under torchrun every rank learns whether all of them can run."""
    error, extractor, writer = None, None, None
    try:
        if world.is_main or not world.collective:
            check_output(out, what="--out")  # before the model is built and the images are read
        config = replace(config, device=device_spec(world, config.device))
        extractor = FeatureExtractor(config, world)
        b = extractor.config.batch_size
        unit = unit_size(len(source), b, unit_items)
        writer = StoreWriter(out, extractor.header(source), len(source), extractor.tap_specs(), unit,
                             config.dtype)
        if world.is_main or not world.collective:  # processes that never talk each make it ready
            writer.prepare(overwrite)
    except FeatxError as e:
        error = str(e)
    except OSError as e:
        error = str(os_error(e, "write", out))
    agree(world, error)
    if not world.collective:
        return writer, extractor
    complete = broadcast(world, writer.already_complete)  # rank 0 decides (--overwrite redoes it)
    if not world.is_main:
        try:
            writer.join(complete)
        except FeatxError as e:
            error = str(e)
    agree(world, error)  # every rank: each one sees the parts folder rank 0 made
    return writer, extractor


def _summary_of(out) -> tuple[int, list[tuple[str, str]], int]:
    """Rows, failures and rows from the feature cache of a finished file (opened once)."""
    with FeatureStore(out) as fs:
        return len(fs), fs.failed, int(fs.attrs.get("cache_hits", 0))
