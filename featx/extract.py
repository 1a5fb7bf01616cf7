"""The extraction runner: work units -> decode -> forward -> writer.

:class:`FeatureExtractor` is a frozen backbone with its taps, preprocessing and device
(uint8 batches in, pooled features out); :func:`iterate` decodes a range of items in
DataLoader workers while this process runs the forward pass; :func:`extract` feeds the
batches to a :class:`featx.store.StoreWriter`, skipping item ranges a killed run already
published, and has the writer assemble the file when every item is done.
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from featx import registry
from featx.cache import FeatureCache, setting_digest
from featx.cache import default_location as default_cache_location
from featx.decode import DEFAULT_MAX_PIXELS, Decoded, collate
from featx.device import autocast_dtype, resolve_device
from featx.distributed import World, agree, barrier, broadcast, cpu_share, device_spec, session
from featx.errors import FeatxError, root_cause
from featx.files import check_output, os_error
from featx.graph import COMPILE_MODES, CompiledTaps, compile_taps, inductor_cache, should_compile, should_freeze
from featx.preprocess import Normalizer, Preprocess
from featx.sources import Source, source_fingerprint
from featx.store import FeatureStore, StoreWriter, make_header
from featx.taps import TapRecorder, check_pool, map_sizes
from featx.weights import load_backbone, preprocess_for, resolve_weights


@dataclass
class ExtractConfig:
    """Everything that decides the features (and a few things that only decide speed)."""

    backbone: str = "resnet50"
    weights: str = "DEFAULT"  # DEFAULT | enum member | none | path
    layers: tuple[str, ...] = ()  # empty: the backbone's default tap
    pools: tuple[str, ...] = ("avg",)
    image_size: int | None = None  # override the weights' resize/crop
    grayscale: bool = False
    batch_size: int | None = None  # None: 32 on CPU (cache-friendly, measured), 128 on CUDA
    workers: int | None = None  # None: one per core, at most 8 (0 on tiny jobs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True  # faster on CUDA and, measured here, on CPU too (oneDNN)
    dtype: str = "float32"  # stored feature dtype: float32 | float16
    on_error: str = "skip"  # skip (record the failure) | fail
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool | None = None  # None: a bar on a terminal only
    jpeg_draft: bool = True
    preprocessing: str | None = None  # a Preprocess as JSON: replaces the weights' own (predict)
    seed: int = 0  # initialisation of random weights (weights="none")
    cache: str | None = "auto"  # feature cache: auto ($FEATX_CACHE or cache/features/), a folder, or None
    compile: str = "auto"  # auto (when enough images: graph.AUTO_MIN_IMAGES) | on | off
    small_maps: str = "refuse"  # a gridK tap whose map is smaller than KxK: refuse | skip (sweep: leave it out)


class FeatureExtractor:
    """A frozen backbone with its taps, preprocessing and device: uint8 batches -> features.

    Args:
        config: the extraction settings.
    """

    def __init__(self, config: ExtractConfig, world: World = World()):
        self.config = c = replace(config)  # a copy: the defaults filled in below are this extractor's
        self.world = world
        registry.check_backbone(c.backbone)
        for p in c.pools:
            check_pool(p)
        self.device = resolve_device(c.device)
        model, self.weights = load_backbone(c.backbone, resolve_weights(c.backbone, c.weights, c.seed))
        if c.preprocessing:
            self.pre = Preprocess.from_json(c.preprocessing)
        else:
            self.pre = preprocess_for(c.backbone, self.weights, c.image_size, c.grayscale)
            self.pre.jpeg_draft = c.jpeg_draft
        layers = list(c.layers) or [registry.default_tap(c.backbone, model)]
        layers = [registry.resolve_tap(c.backbone, model, layer) for layer in layers]
        self.layers = list(dict.fromkeys(layers))
        multi = len(c.pools) > 1
        self.taps = {(f"{layer}@{p}" if multi else layer): (layer, p) for layer in self.layers for p in c.pools}
        self.skipped = self._fit_grids(model)  # gridK taps on maps smaller than KxK, when small_maps="skip"
        self.default_tap = next(iter(self.taps))
        for p in model.parameters():
            p.requires_grad_(False)
        if c.batch_size is None:
            c.batch_size = 128 if self.device.type == "cuda" else 32
        self.amp = autocast_dtype(c.precision, self.device)
        model = model.to(self.device)
        if c.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.normalize = Normalizer(self.pre, self.device, c.channels_last)
        self.nhwc = registry.family_of(c.backbone).nhwc
        self._dims: dict[str, int] | None = None
        if c.compile not in COMPILE_MODES:
            raise FeatxError(f"--compile {c.compile!r} is not one of {', '.join(COMPILE_MODES)}.")
        self.compiled: CompiledTaps | None = None
        self._compile_decided = False

    def _fit_grids(self, model: torch.nn.Module) -> dict[str, tuple]:
        """Refuse (or, with ``small_maps="skip"``, leave out) gridK taps whose map is smaller
        than K x K: such a grid repeats the map's cells, and a large K fills memory."""
        grids = {name: (layer, int(p[4:])) for name, (layer, p) in self.taps.items() if p.startswith("grid")}
        if not grids:
            return {}
        blank = torch.zeros(1, 3, self.pre.crop, self.pre.crop)
        sizes = map_sizes(model.eval(), list(dict.fromkeys(layer for layer, _ in grids.values())), blank,
                          registry.family_of(self.config.backbone).nhwc)
        small = {name: sizes[layer] for name, (layer, k) in grids.items() if k > min(sizes[layer])}
        if not small:
            return {}
        if self.config.small_maps != "skip" or len(small) == len(self.taps):
            name, (h, w) = next(iter(small.items()))
            layer, p = self.taps[name]
            raise FeatxError(f"--pool {p} asks for a {p[4:]}x{p[4:]} grid, but {layer}'s map is {h}x{w} at "
                             f"{self.pre.crop} px; use gridK with K <= {min(h, w)}, a larger --image-size, or an "
                             "earlier --layer.")
        for name in small:
            del self.taps[name]
        return small

    def prepare(self, n_images: int) -> None:
        """Compile the tap-cut graph when ``config.compile`` says so for ``n_images`` images
        (once; a failure leaves the eager path, with one warning)."""
        if self._compile_decided or not should_compile(self.config.compile, self.device, n_images):
            return
        self._compile_decided = True
        self.dims()  # measured eagerly, before the graph exists
        inductor_cache(Path(default_cache_location()) / "inductor")
        example = self.normalize(torch.zeros(1, 3, self.pre.crop, self.pre.crop, dtype=torch.uint8))
        with torch.inference_mode(), self._autocast():
            self.compiled = compile_taps(self.model, self.taps, self.nhwc, self.config.batch_size, example,
                                         freeze=should_freeze(self.config.backbone, self.pre.crop, n_images))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def __call__(self, x: torch.Tensor, taps: list[str] | None = None) -> dict[str, np.ndarray]:
        """Features of a uint8 batch (N, 3, H, W) for every tap (or the named ones: the
        forward pass stops once they fired), as float32 arrays.

        A batch smaller than the batch size is padded to it (with blank images), so every
        image goes through the same batch shape: oneDNN's kernels, and so the last bits of
        a vector, depend on the batch size, and this makes an image's vector the same
        whichever images share its batch, in a full run, a resumed one or a few cache misses.
        """
        wanted = self.taps if taps is None else {t: self.taps[t] for t in taps}
        n = x.shape[0]
        if n < self.config.batch_size:
            x = torch.cat([x, x.new_zeros((self.config.batch_size - n, *x.shape[1:]))])
        return {k: v[:n] for k, v in self._forward(x, wanted).items()}

    def _forward(self, x: torch.Tensor, wanted: dict) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = self.normalize(x)
            with self._autocast():
                out = self._compiled(x, wanted) if self.compiled is not None else None
                if out is None:
                    with TapRecorder(self.model, wanted, self.nhwc) as rec:
                        out = rec.run(x)
            return {k: v.float().cpu().numpy() for k, v in out.items()}

    def _compiled(self, x: torch.Tensor, wanted: dict) -> dict | None:
        """The compiled graph's taps (it computes all of them); None, with one warning, and
        eager from then on, if it fails at run time."""
        try:
            return {k: v for k, v in self.compiled(x).items() if k in wanted}
        except Exception as e:  # noqa: BLE001 - e.g. a recompile the compiler cannot do
            warnings.warn(f"the compiled network failed ({root_cause(e)}); running it eagerly.", stacklevel=3)
            self.compiled = None
            return None

    def cache_settings(self) -> dict[str, dict]:
        """Per stored tap, everything that decides its vectors: the feature cache's settings.

        The weights enter by their sha256 (a renamed weights file still hits); device,
        precision, memory layout and torch's version enter because they change the last bits
        (``cache.FEATURE_CODE_VERSION`` covers featx's own decoding and pooling code).
        Compiled and eager vectors share a setting (they agree to cosine > 0.9999), so
        ``--compile auto`` choosing differently for a small rerun still hits.
        """
        c = self.config
        common = {"backbone": c.backbone, "weights_sha256": self.weights.sha256, "preprocessing": self.pre.to_json(),
                  "precision": str(self.amp or "float32"), "dtype": c.dtype, "channels_last": c.channels_last,
                  "device": self.device.type, "torch": str(torch.__version__),
                  # which images have a row at all: a hit must not skip the pixel limit
                  "max_pixels": int(c.max_pixels)}
        return {name: {**common, "layer": layer, "pool": p} for name, (layer, p) in self.taps.items()}

    def dims(self) -> dict[str, int]:
        """Width of every tap, from one blank image at the input size."""
        if self._dims is None:
            blank = torch.zeros(1, 3, self.pre.crop, self.pre.crop, dtype=torch.uint8)
            self._dims = {k: int(v.shape[1]) for k, v in self._forward(blank, self.taps).items()}
        return self._dims

    def tap_specs(self) -> dict[str, dict]:
        """Stored tap name -> layer, pooling and width (what the writer needs up front)."""
        return {name: {"layer": layer, "pool": p, "dim": self.dims()[name]} for name, (layer, p) in self.taps.items()}

    def header(self, source: Source) -> dict:
        """Root attributes of the feature file; the fingerprint decides whether an existing
        output or unfinished run is this job (the writer adds the unit size to the latter)."""
        c, w = self.config, self.weights
        fingerprint = {
            "backbone": c.backbone, "weights": w.id, "weights_sha256": w.sha256, "weights_seed": w.seed,
            "taps": self.taps, "preprocessing": json.loads(self.pre.to_json()), "dtype": c.dtype,
            "precision": str(self.amp), "batch_size": c.batch_size,
            "source": source_fingerprint(source),
        }
        provenance = {
            "backbone": c.backbone, "weights": w.id, "weights_sha256": w.sha256,
            "weights_path": os.path.abspath(w.path) if w.path else "",
            **({"weights_seed": w.seed} if w.seed is not None else {}),
            "taps": self.taps, "pooling": {name: p for name, (_, p) in self.taps.items()},
            "preprocessing": self.pre.to_json(),
            "precision": str(self.amp or "float32").replace("torch.", ""), "compile": c.compile,
            "torch_version": str(torch.__version__), "torchvision_version": torchvision.__version__,
            "source": source.describe(),
        }
        return make_header(provenance, fingerprint)


def _workers(config: ExtractConfig, n: int, world: World = World()) -> int:
    if config.workers is not None:
        return config.workers
    if n <= 2 * config.batch_size:
        return 0  # starting processes costs more than it saves
    return min(cpu_share(world), 8)  # the processes on a node share its cores


def iterate(source: Source, extractor: FeatureExtractor, items: range | list[range], progress=None):
    """Yield ``(batch items, good indices, features | None, failures)`` per batch, in order.

    Decoding runs in DataLoader workers (uint8 tensors cross the process boundary), the
    forward pass in this process, so decode and compute overlap.  Batches are cut at
    multiples of the batch size from the start of each range (each work unit), so a
    resumed or redistributed run forms exactly the same batches.

    Args:
        items: a range of items, or several (work units), visited in the order given.
        progress: None (a bar on a terminal), False, or a callable taking the batch size.
    """
    c = extractor.config
    ranges = [items] if isinstance(items, range) else list(items)
    batches = [list(range(s, min(s + c.batch_size, r.stop))) for r in ranges for s in range(r.start, r.stop, c.batch_size)]
    loader = _loader(source, extractor, batches, sum(len(r) for r in ranges))
    bar = None
    if not callable(progress):
        bar = tqdm(total=sum(len(r) for r in ranges), unit="img", disable=(None if progress is None else not progress),
                   desc=f"extract {c.backbone}", leave=False)
        progress = bar.update
    try:
        for batch_items, (x, good, bad) in zip(batches, loader):
            _check_errors(source, bad, c)
            feats = extractor(x) if x is not None else None
            yield batch_items, good, feats, bad
            progress(len(batch_items))
    finally:
        if bar is not None:
            bar.close()


def _loader(source: Source, extractor: FeatureExtractor, batch_sampler, n_items: int):
    """Decode in DataLoader workers (uint8 tensors cross the process boundary) the batches
    the sampler gives (a list, or an iterable read as the loader goes)."""
    c = extractor.config
    n_workers = _workers(c, n_items, extractor.world)
    return torch.utils.data.DataLoader(
        Decoded(source, extractor.pre, c.max_pixels), batch_sampler=batch_sampler, num_workers=n_workers,
        collate_fn=collate, pin_memory=extractor.device.type == "cuda", prefetch_factor=4 if n_workers else None,
    )


NONFINITE = "the network's output is not finite (nan or inf)"


def _check_errors(source: Source, bad, config: ExtractConfig) -> None:
    if bad and config.on_error == "fail":
        i, err = bad[0]
        what = "cannot extract" if err.startswith(NONFINITE) else "cannot decode"
        raise FeatxError(f"{what} {source.ids[i]}: {err} (--on-error skip records it and goes on).")


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
                cache = FeatureCache.open(None if config.cache == "auto" else config.cache)
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


class _Plan:
    """The DataLoader's batches: the items the network must see, in full batches across units.

    Unit by unit, in order, the cache (when there is one) is asked for the unit's images
    first; the items with at least one tap missing join one queue, cut into batches of the
    batch size as it fills (without a cache, exactly each unit's batches, the units being
    multiples of the batch size).  So a rerun with a few misses scattered over many units
    computes full batches, and only the job's last batch is padded.  ``done`` lists, as the
    units are looked up, each unit with the number of queued items up to its end: the
    consumer publishes a unit once that many items went through the network.
    """

    def __init__(self, source: Source, units: list[range], batch_size: int, lookup):
        self.source, self.units, self.batch_size, self.lookup = source, units, batch_size, lookup
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


def _run_units(source: Source, extractor: FeatureExtractor, writer: StoreWriter, units: list[range],
               cache: FeatureCache | None, progress) -> tuple[list, int]:
    """Extract ``units`` (asking the cache first) and hand each finished unit to the writer."""
    lookup = _CacheLookup(source, extractor, cache)
    todo = lookup.count_todo(units)  # compile for the images the network must see, if any
    if todo:
        extractor.prepare(todo)
    plan = _Plan(source, units, extractor.config.batch_size, lookup)
    failed, hits_total, seen = [], 0, 0
    unit_at = {r.start: u for u, r in enumerate(units)}  # units start at multiples of the unit size
    feats_of: dict[int, dict] = {}  # item -> tap -> vector, until its unit is published
    bad_of: dict[int, str] = {}

    def publish_ready():
        nonlocal failed, hits_total
        while plan.done and plan.done[0][1] <= seen:
            u = plan.done.popleft()[0]
            unit, (keys, hits) = units[u], plan.cached.pop(u)
            acc = {"feats": {i: feats_of.pop(i) for i in unit if i in feats_of},
                   "bad": {i: bad_of.pop(i) for i in unit if i in bad_of}}
            hits_total += _publish_unit(source, extractor, writer, unit, hits, acc)
            lookup.store(unit, keys, hits, acc["feats"])
            failed += [(source.ids[i], e) for i, e in sorted(acc["bad"].items())]
            progress(len(unit))

    loader = _loader(source, extractor, plan, sum(len(u) for u in units)) if units else []
    dtype = np.dtype(extractor.config.dtype)
    for x, good, bad in loader:
        _check_errors(source, bad, extractor.config)
        n = len(good) + len(bad)
        if x is not None:
            hits_of = [plan.cached[unit_at[i - i % writer.unit_items]][1] for i in good]
            missing = [t for t in extractor.taps if any(i not in h.get(t, {}) for i, h in zip(good, hits_of))]
            feats = extractor(x, missing)
            for k, i in enumerate(good):
                row = {t: v[k] for t, v in feats.items()}
                if all(np.isfinite(v.astype(dtype)).all() for v in row.values()):
                    feats_of[i] = row
                else:  # a row of nan or inf would break every tool downstream: a recorded failure
                    bad.append((i, NONFINITE + (" as float16 (above 65504?)" if dtype == np.float16 else "")))
            _check_errors(source, bad, extractor.config)
        bad_of.update(bad)
        seen += n
        publish_ready()
    publish_ready()  # units the cache answered whole, after the last batch
    lookup.close()
    return failed, hits_total


def _publish_unit(source, extractor, writer, unit: range, hits: dict, acc: dict) -> int:
    """One unit's rows in item order (cached or computed), given to the writer; returns the
    number of rows that came wholly from the cache."""
    rows, n_hits = [], 0
    for i in unit:
        if i in acc["bad"]:
            continue
        computed = acc["feats"].get(i, {})
        if not computed:
            n_hits += 1
        rows.append((i, {t: computed[t] if t in computed else hits[t][i] for t in extractor.taps}))
    good = [i for i, _ in rows]
    taps = {t: np.stack([r[t] for _, r in rows]) for t in extractor.taps} if rows else None
    bad = [i for i in unit if i in acc["bad"]]
    writer.add(unit.start, unit.stop, taps, source.labels[good], [source.ids[i] for i in good],
               [source.ids[i] for i in bad], [acc["bad"][i] for i in bad], cache_hits=n_hits)
    return n_hits


class _CacheLookup:
    """The feature cache as the runner uses it: content keys, lookups and additions per
    unit; any cache error turns it off for the rest of the run (with one warning)."""

    def __init__(self, source: Source, extractor: FeatureExtractor, cache: FeatureCache | None):
        self.source, self.cache = source, cache
        self.settings = {}
        if cache is not None:
            for tap, desc in extractor.cache_settings().items():
                self.settings[tap] = setting_digest(desc)
                self._guard(cache.register, self.settings[tap], desc)
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
        return keys if keys is not None else list(self.pool.map(self.source.content_key, unit))

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
        writer.already_complete = complete
        try:
            if not complete:
                writer.join()
        except FeatxError as e:
            error = str(e)
    agree(world, error)  # every rank: each one sees the parts folder rank 0 made
    return writer, extractor


def _summary_of(out) -> tuple[int, list[tuple[str, str]], int]:
    """Rows, failures and rows from the feature cache of a finished file (opened once)."""
    with FeatureStore(out) as fs:
        return len(fs), fs.failed, int(fs.attrs.get("cache_hits", 0))
