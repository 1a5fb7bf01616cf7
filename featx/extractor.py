"""The extractor: a frozen backbone with its taps, preprocessing and device, and its setting.

:class:`FeatureExtractor` turns uint8 batches into pooled features of every tap.  It knows
its :class:`featx.setting.FeatureSetting` (everything that decides its vectors) and the
width of every tap before the network exists: the weights are identified by their sha256,
and the taps are resolved, checked and measured on the architecture's meta-device skeleton.
The network itself is built on first use, so a run whose every vector comes from the feature
cache never builds it (random weights, identified by the parameters they make, are the
exception: they are made at once).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision

from featx import adapters
from featx.cache import FeatureCache
from featx.cache import default_location as default_cache_location
from featx.decode import DEFAULT_MAX_PIXELS
from featx.device import autocast_dtype, resolve_device
from featx.distributed import World
from featx.errors import FeatxError, root_cause
from featx.graph import (AUTO_PROBE_BATCHES, COMPILE_MODES, CompiledTaps, CompileRecord, compile_taps, should_freeze,
                         worth_compiling)
from featx.preprocess import Normalizer, Preprocess
from featx.setting import FeatureSetting
from featx.sources import Source, source_fingerprint
from featx.store import featx_version, make_header
from featx.taps import TapRecorder, check_pool, map_sizes, widths

SMALL_MAPS = ("refuse", "skip")
TTA = ("none", "flip")


@dataclass
class ExtractConfig:
    """What to extract and how (featx.setting.FROM_CONFIG and NOT_DECIDING sort its fields
    into those that decide the vectors and those that only decide speed or output)."""

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
    compile: str = "auto"  # auto (measured on the first batches: graph.worth_compiling) | on | off
    small_maps: str = "refuse"  # a gridK tap whose map is smaller than KxK: refuse | skip (sweep: leave it out)
    tta: str = "none"  # none | flip: each vector the mean of the image's and its mirror image's


def _recall(folder: Path | None, made: str) -> str | None:
    """The digest of a seeded random network recorded in the feature cache, if any."""
    if folder is None or not (folder / "index.sqlite").is_file():
        return None
    cache = FeatureCache.open(folder, create=False)
    if cache is None:
        return None
    try:
        return cache.made_weights(made)
    except sqlite3.Error as e:
        warnings.warn(f"the feature cache at {folder} cannot say which random weights it knows ({e}); making them.",
                      stacklevel=3)
        return None
    finally:
        cache.close()


def cache_folder(config: ExtractConfig) -> Path | None:
    """The feature cache's folder of a config (None: no cache)."""
    if not config.cache:
        return None
    return default_cache_location() if config.cache == "auto" else Path(config.cache)


class FeatureExtractor:
    """A frozen backbone with its taps, preprocessing and device: uint8 batches -> features.

    Args:
        config: the extraction settings (copied: the defaults filled in are this extractor's).
        world: this process's place among several (decoding workers share the cores).
    """

    def __init__(self, config: ExtractConfig, world: World = World()):
        self.config = c = replace(config)
        self.world = world
        self.backbone = bk = adapters.backbone(c.backbone)
        for p in c.pools:
            check_pool(p)
        if c.compile not in COMPILE_MODES:
            raise FeatxError(f"--compile {c.compile!r} is not one of {', '.join(COMPILE_MODES)}.")
        if c.small_maps not in SMALL_MAPS:
            raise FeatxError(f"small_maps {c.small_maps!r} is not one of {', '.join(SMALL_MAPS)}.")
        if c.tta not in TTA:
            raise FeatxError(f"--tta {c.tta!r} is not one of {', '.join(TTA)}.")
        self.device = resolve_device(c.device)
        if c.batch_size is None:
            c.batch_size = 128 if self.device.type == "cuda" else 32
        if c.batch_size < 1:
            raise FeatxError(f"--batch-size {c.batch_size} must be at least 1.")
        self.amp = autocast_dtype(c.precision, self.device)
        self._model: torch.nn.Module | None = None
        self.weights = bk.identify(bk.resolve_weights(c.weights, c.seed))
        self._made = None  # random weights: what makes them, and the digest the feature cache recorded
        if self.weights.id == "none":  # identified by the parameters it makes: made now, unless recorded
            self._made = json.dumps([c.backbone, self.weights.seed, str(torch.__version__), featx_version()])
            recorded = _recall(cache_folder(c), self._made)
            if recorded:
                self.weights = replace(self.weights, sha256=recorded)
            else:
                _ = self.model
        shapes = self._model if self._model is not None else bk.skeleton(self.weights)
        self.layout = bk.layout(shapes)
        if c.preprocessing:
            self.pre = Preprocess.from_json(c.preprocessing)
        else:
            self.pre = adapters.preprocessing(bk, self.weights, c.image_size, c.grayscale)
            self.pre.jpeg_draft = c.jpeg_draft
        layers = list(c.layers) or [bk.default_tap(shapes)]
        self.layers = list(dict.fromkeys(bk.resolve_tap(shapes, layer) for layer in layers))
        multi = len(c.pools) > 1
        self.taps = {(f"{layer}@{p}" if multi else layer): (layer, p) for layer in self.layers for p in c.pools}
        self.skipped = self._fit_grids(shapes)  # gridK taps on maps smaller than KxK, when small_maps="skip"
        self.default_tap = next(iter(self.taps))
        try:  # before any image, from shapes only
            self.dims = widths(shapes, self.taps, self.pre.crop, self.layout)
        except FeatxError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a transformer made for one image size
            raise FeatxError(f"backbone {c.backbone} cannot take {self.pre.crop}x{self.pre.crop} images "
                             f"({root_cause(e)}); use another --image-size, or none (the backbone's own).") from None
        self.normalize = Normalizer(self.pre, self.device, c.channels_last)
        self.setting = FeatureSetting(
            backbone=c.backbone, weights_sha256=self.weights.sha256,
            taps=tuple((name, layer, p) for name, (layer, p) in self.taps.items()),
            preprocessing=self.pre.to_json(), precision=str(self.amp or torch.float32).replace("torch.", ""),
            dtype=c.dtype, channels_last=bool(c.channels_last), device=self.device.type,
            torch_version=str(torch.__version__), max_pixels=int(c.max_pixels), tta=c.tta)
        self.compiled: CompiledTaps | None = None
        self._compile_decided = False
        self._todo: int | None = None  # images the job sends through the network (prepare)
        self._timing: tuple[str, float, list] | None = None  # auto compiled: (graph, eager s/image, batch times)

    @property
    def model(self) -> torch.nn.Module:
        """The network with its weights, on the device, frozen (built on first use)."""
        if self._model is None:
            model, made = self.backbone.load(self.weights)
            if self._made is not None and self.weights.sha256 and made.sha256 != self.weights.sha256:
                raise FeatxError(f"the feature cache at {cache_folder(self.config)} records other random "
                                 f"weights for {self._made}; remove that folder (its vectors are suspect).")
            self.weights = made
            for p in model.parameters():
                p.requires_grad_(False)
            model = model.to(self.device)
            if self.config.channels_last:
                model = model.to(memory_format=torch.channels_last)
            self._model = model.eval()
        return self._model

    def remember_weights(self, cache: FeatureCache) -> None:
        """Random weights: record in the feature cache the digest of the network made, so a
        later run answered by the cache needs no network to know its weights."""
        if self._made is None or self._model is None:
            return
        try:
            cache.remember_weights(self._made, self.weights.sha256)
        except sqlite3.Error as e:  # it only costs a later run a build
            warnings.warn(f"the feature cache at {cache.root} cannot record the random weights' digest ({e}).",
                          stacklevel=2)

    def _fit_grids(self, shapes: torch.nn.Module) -> dict[str, tuple]:
        """Refuse (or, with ``small_maps="skip"``, leave out) gridK taps whose map is smaller
        than K x K: such a grid repeats the map's cells, and a large K fills memory."""
        grids = {name: (layer, int(p[4:])) for name, (layer, p) in self.taps.items() if p.startswith("grid")}
        if not grids:
            return {}
        blank = torch.zeros(1, 3, self.pre.crop, self.pre.crop, device=next(shapes.parameters()).device)
        sizes = map_sizes(shapes, list(dict.fromkeys(layer for layer, _ in grids.values())), blank, self.layout)
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
        """Before ``n_images`` images go through the network: ``--compile on`` compiles the
        tap-cut graph now; ``auto`` lets the first batches run eagerly, measures them, and
        compiles for the images left when that pays (:func:`featx.graph.worth_compiling`).
        A failure leaves the eager path, with one warning.  Inductor keeps the compiled code
        in ``<feature cache>/inductor`` (nowhere of featx's without a cache), and
        ``featx-compiled.json`` there what compiling each graph cost."""
        self._todo, self._probe = n_images, []
        if self.config.compile == "on" and not self._compile_decided:
            self._compile(n_images)

    def _compile(self, n_images: int, freeze: bool | None = None) -> None:
        """Compile the tap-cut graph for ``n_images`` images (frozen or not as
        :func:`featx.graph.should_freeze` says for them, unless ``freeze`` is given)."""
        self._compile_decided = True
        inductor = self._inductor_folder()
        if freeze is None:
            freeze = should_freeze(self.backbone.gflop(self.pre.crop), n_images)
        example = self.normalize(torch.zeros(1, 3, self.pre.crop, self.pre.crop, dtype=torch.uint8))
        with torch.inference_mode(), self._autocast():
            self.compiled = compile_taps(self.model, self.taps, self.layout, self.net_batch, example,
                                         freeze=freeze, cache_dir=inductor)
        if self.compiled is not None:
            CompileRecord(inductor).note(self._graph_key(freeze), self.compiled.compile_seconds)

    def _inductor_folder(self) -> Path | None:
        folder = cache_folder(self.config)
        return folder / "inductor" if folder else None

    def _graph_key(self, freeze: bool) -> str:
        """What decides the compiled graph (inductor compiles it again when any of it changes)."""
        return json.dumps([self.config.backbone, sorted(self.taps.items()), self.pre.crop, self.net_batch,
                           freeze, self.setting.precision, self.config.channels_last, self.device.type,
                           str(torch.__version__)])

    def _observe(self, seconds: float) -> None:
        """``--compile auto``: time the first eager batches, then decide for the rest."""
        self._probe.append(seconds)
        if len(self._probe) < AUTO_PROBE_BATCHES:
            return
        self._compile_decided = True
        per_image = min(self._probe[1:] or self._probe) / self.config.batch_size  # the first one warms up
        left = self._todo - len(self._probe) * self.config.batch_size
        freeze = should_freeze(self.backbone.gflop(self.pre.crop), left)
        key, record = self._graph_key(freeze), CompileRecord(self._inductor_folder())
        cost = record.estimate(key, self.device, freeze)
        if left > 0 and worth_compiling(per_image, left, cost, record.speedup(key)):
            self._compile(left, freeze)
            if self.compiled is not None:  # measure what it gained, for the next run's decision
                self._timing = (key, per_image, [])

    @property
    def net_batch(self) -> int:
        """Images in each batch the network sees: twice the batch size with ``--tta flip``
        (each image and its mirror image in one forward pass)."""
        return self.config.batch_size * (2 if self.config.tta == "flip" else 1)

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
        probing = self.config.compile == "auto" and not self._compile_decided and self._todo is not None
        t0 = time.perf_counter()
        with torch.inference_mode():
            b = x.shape[0]
            if self.config.tta == "flip":  # the mirror images in the same forward pass
                x = torch.cat([x, x.flip(-1)])
            x = self.normalize(x)
            with self._autocast():
                out = self._compiled(x, wanted) if self.compiled is not None else None
                if out is None:
                    with TapRecorder(self.model, wanted, self.layout) as rec:
                        out = rec.run(x)
                if self.config.tta == "flip":
                    out = {k: (v[:b].float() + v[b:].float()) / 2 for k, v in out.items()}
            out = {k: v[:n].float().cpu().numpy() for k, v in out.items()}  # on the CPU: the work is done
        if n == self.config.batch_size and len(wanted) == len(self.taps):  # a full batch, every tap
            if probing:
                self._observe(time.perf_counter() - t0)
            elif self._timing is not None and self.compiled is not None:
                self._time_compiled(time.perf_counter() - t0)
        return out

    def _time_compiled(self, seconds: float) -> None:
        """``--compile auto``: the compiled graph's speed-up over the eager batches measured,
        recorded beside inductor's cache for the next decision on this graph (the first
        compiled batch counts as warm-up)."""
        key, eager, times = self._timing
        times.append(seconds)
        if len(times) > AUTO_PROBE_BATCHES:
            self._timing = None
            compiled = min(times[1:]) / self.config.batch_size
            CompileRecord(self._inductor_folder()).note(key, speedup=eager / compiled)

    def _compiled(self, x: torch.Tensor, wanted: dict) -> dict | None:
        """The compiled graph's taps (it computes all of them); None, with one warning, and
        eager from then on, if it fails at run time."""
        try:
            return {k: v for k, v in self.compiled(x).items() if k in wanted}
        except Exception as e:  # noqa: BLE001 - e.g. a recompile the compiler cannot do
            warnings.warn(f"the compiled network failed ({root_cause(e)}); running it eagerly.", stacklevel=3)
            self.compiled.close()
            self.compiled = None
            return None

    def tap_specs(self) -> dict[str, dict]:
        """Stored tap name -> layer, pooling and width (what the writer needs up front)."""
        return {name: {"layer": layer, "pool": p, "dim": self.dims[name]} for name, (layer, p) in self.taps.items()}

    def header(self, source: Source) -> dict:
        """Root attributes of the feature file: the setting, how the file was made, and the
        fingerprint an unfinished run must match to be continued (the writer adds the unit
        size)."""
        c, w = self.config, self.weights
        provenance = {
            "backbone": c.backbone, "weights": w.id, "weights_sha256": w.sha256,
            "weights_path": os.path.abspath(w.path) if w.path else "",
            **({"weights_seed": w.seed} if w.seed is not None else {}),
            "taps": self.taps, "pooling": {name: p for name, (_, p) in self.taps.items()},
            "preprocessing": self.pre.to_json(), "precision": self.setting.precision, "compile": c.compile,
            "tta": c.tta,
            "torch_version": str(torch.__version__), "torchvision_version": torchvision.__version__,
            "source": source.describe(), "setting": self.setting.to_json(),
        }
        return make_header(provenance, self.setting.fingerprint(source_fingerprint(source)))
