"""The extraction runner: work units -> decode -> forward -> writer.

:class:`FeatureExtractor` is a frozen backbone with its taps, preprocessing and device
(uint8 batches in, pooled features out); :func:`iterate` decodes a range of items in
DataLoader workers while this process runs the forward pass; :func:`extract` feeds the
batches to a :class:`featx.store.StoreWriter`, skipping item ranges a killed run already
published, and has the writer assemble the file when every item is done.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from featx import registry
from featx.decode import DEFAULT_MAX_PIXELS, Decoded, collate
from featx.device import autocast_dtype, resolve_device
from featx.errors import FeatxError
from featx.preprocess import Normalizer, Preprocess
from featx.sources import Source, source_fingerprint
from featx.store import FeatureStore, StoreWriter, make_header
from featx.taps import TapRecorder, check_pool
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


class FeatureExtractor:
    """A frozen backbone with its taps, preprocessing and device: uint8 batches -> features.

    Args:
        config: the extraction settings.
    """

    def __init__(self, config: ExtractConfig):
        self.config = c = config
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

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Features of a uint8 batch (N, 3, H, W) for every tap, as float32 arrays."""
        with torch.inference_mode():
            x = self.normalize(x)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                with TapRecorder(self.model, self.taps, self.nhwc) as rec:
                    out = rec.run(x)
            return {k: v.float().cpu().numpy() for k, v in out.items()}

    def dims(self) -> dict[str, int]:
        """Width of every tap, from one blank image at the input size."""
        if self._dims is None:
            blank = torch.zeros(1, 3, self.pre.crop, self.pre.crop, dtype=torch.uint8)
            self._dims = {k: int(v.shape[1]) for k, v in self(blank).items()}
        return self._dims

    def tap_specs(self) -> dict[str, dict]:
        """Stored tap name -> layer, pooling and width (what the writer needs up front)."""
        return {name: {"layer": layer, "pool": p, "dim": self.dims()[name]} for name, (layer, p) in self.taps.items()}

    def header(self, source: Source) -> dict:
        """Root attributes of the feature file; the fingerprint decides resume compatibility."""
        c, w = self.config, self.weights
        fingerprint = {
            "backbone": c.backbone, "weights": w.id, "weights_sha256": w.sha256, "weights_seed": w.seed,
            "taps": self.taps, "preprocessing": json.loads(self.pre.to_json()), "dtype": c.dtype,
            "precision": str(self.amp), "batch_size": c.batch_size, "source": source_fingerprint(source),
        }
        provenance = {
            "backbone": c.backbone, "weights": w.id, "weights_sha256": w.sha256,
            "weights_path": os.path.abspath(w.path) if w.path else "",
            **({"weights_seed": w.seed} if w.seed is not None else {}),
            "taps": self.taps, "pooling": {name: p for name, (_, p) in self.taps.items()},
            "preprocessing": self.pre.to_json(),
            "precision": str(self.amp or "float32").replace("torch.", ""),
            "torch_version": str(torch.__version__), "torchvision_version": torchvision.__version__,
            "source": source.describe(),
        }
        return make_header(provenance, fingerprint)


def _workers(config: ExtractConfig, n: int) -> int:
    if config.workers is not None:
        return config.workers
    if n <= 2 * config.batch_size:
        return 0  # starting processes costs more than it saves
    return min(os.cpu_count() or 1, 8)


def iterate(source: Source, extractor: FeatureExtractor, items: range, progress: bool | None = None):
    """Yield ``(batch items, good indices, features | None, failures)`` per batch, in source order.

    Decoding runs in DataLoader workers (uint8 tensors cross the process boundary), the
    forward pass in this process, so decode and compute overlap.  Batches are cut at
    multiples of the batch size from ``items.start``.
    """
    c = extractor.config
    data = Decoded(source, extractor.pre, c.max_pixels)
    batches = [list(range(s, min(s + c.batch_size, items.stop))) for s in range(items.start, items.stop, c.batch_size)]
    n_workers = _workers(c, len(items))
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=batches, num_workers=n_workers, collate_fn=collate,
        pin_memory=extractor.device.type == "cuda", prefetch_factor=4 if n_workers else None,
    )
    bar = tqdm(total=len(items), unit="img", disable=(None if progress is None else not progress),
               desc=f"extract {c.backbone}", leave=False)
    try:
        for batch_items, (x, good, bad) in zip(batches, loader):
            if bad and c.on_error == "fail":
                i, err = bad[0]
                raise FeatxError(f"cannot decode {source.ids[i]}: {err} (--on-error skip records it and goes on).")
            feats = extractor(x) if x is not None else None
            yield batch_items, good, feats, bad
            bar.update(len(batch_items))
    finally:
        bar.close()


@dataclass
class ExtractResult:
    out: str
    n_items: int
    n_rows: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    already_complete: bool = False


def extract(source: Source, out: str | os.PathLike, config: ExtractConfig, overwrite: bool = False,
            items: range | None = None, finalize: bool = True, shard_items: int | None = None) -> ExtractResult:
    """Extract features of every item of ``source`` into the feature file ``out``.

    Resumable: rerun after a kill, it skips the item ranges already stored as shards.

    Args:
        source: the images.
        out: path of the .h5 file.
        config: backbone, taps, pooling, preprocessing, engine settings.
        overwrite: replace an output (or an unfinished run) made with other settings.
        items: a contiguous range of items for this process (multi-process extraction);
            default all.
        finalize: assemble the HDF5 file when every item is done.
        shard_items: items per shard (a multiple of the batch size); default ~ 4096 items.
    """
    t0 = time.perf_counter()
    if len(source) == 0:
        raise FeatxError("the source has no images.")
    extractor = FeatureExtractor(config)
    b = config.batch_size
    writer = StoreWriter(out, extractor.header(source), len(source), extractor.tap_specs(), overwrite=overwrite,
                         shard_items=max(b, (shard_items or max(4096, b)) // b * b))
    if writer.already_complete:
        n_rows, _ = _summary_of(out)
        return ExtractResult(str(out), len(source), n_rows, [], len(source), 0.0, True)
    items = items or range(len(source))
    todo = writer.missing(items)
    resumed = len(items) - sum(len(g) for g in todo)
    failed: list[tuple[str, str]] = []
    for gap in todo:  # one DataLoader per gap: its workers start once
        for batch_items, good, feats, bad in iterate(source, extractor, gap, config.progress):
            writer.add(batch_items[0], batch_items[-1] + 1, feats, source.labels[good], [source.ids[i] for i in good],
                       [source.ids[i] for i, _ in bad], [e for _, e in bad])
            failed += [(source.ids[i], e) for i, e in bad]
        writer.flush()
    if finalize and not writer.missing():
        writer.finalize(source.classes, extractor.default_tap, config.dtype)
        n_rows, failed = _summary_of(out)
    else:
        n_rows = -1
    return ExtractResult(str(out), len(source), n_rows, failed, resumed, time.perf_counter() - t0)


def _summary_of(out) -> tuple[int, list[tuple[str, str]]]:
    """Rows and failures of a finished file (opened once)."""
    with FeatureStore(out) as fs:
        return len(fs), fs.failed
