"""The batch engine: images -> frozen backbone -> pooled taps -> feature store.

One forward pass serves every requested tap: a forward hook on each tapped module pools
its output at once (so inplace activations later in the network cannot alter it and
memory stays small), and the forward pass is cut short once every tap has fired, so
tapping early layers costs only the early layers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm.auto import tqdm

import featx
from featx import backbones as bb
from featx.errors import FeatxError
from featx.sources import DEFAULT_MAX_PIXELS, Decoded, Source, collate, source_fingerprint
from featx.store import StoreWriter, gaps

POOLS = ("avg", "max", "gem", "grid2", "grid3", "grid4")


def pool(t: torch.Tensor, how: str, nhwc: bool = False) -> torch.Tensor:
    """Pool a feature map (N, C, H, W) or token sequence (N, L, D) to (N, D').

    ``nhwc`` marks a channels-last map (N, H, W, C), as Swin's blocks produce.
    """
    if t.ndim == 2:
        return t
    if t.ndim == 3:  # transformer tokens: pool over the sequence
        t = t.transpose(1, 2).unsqueeze(-1)
    elif nhwc:
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4:
        return t.flatten(1)
    if how == "avg":
        return t.mean((2, 3))
    if how == "max":
        return t.amax((2, 3))
    if how == "gem":  # generalised mean (p=3) of Radenović et al.; assumes activations >= 0
        return t.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3)
    if how.startswith("grid"):
        k = int(how[4:])
        return F.adaptive_avg_pool2d(t, k).flatten(1)
    raise FeatxError(f"unknown pooling {how!r}; allowed: {', '.join(POOLS)}.")


def check_pool(how: str) -> str:
    if how not in POOLS and not (how.startswith("grid") and how[4:].isdigit() and int(how[4:]) > 0):
        raise FeatxError(f"unknown pooling {how!r}; allowed: {', '.join(POOLS)} (gridK for any K).")
    return how


class _Done(Exception):
    """Raised by the last hook to fire: the rest of the network is not needed."""


class TapRecorder:
    """Forward hooks that pool the outputs of named modules during one forward pass.

    Args:
        model: the network.
        taps: stored name -> (module name, pooling); a module name ending in ``:input``
            records the module's input instead of its output.
        nhwc: taps on modules under this name produce channels-last maps (Swin).
    """

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]] | dict[str, str], nhwc: str | None = None):
        self.model, self.nhwc = model, nhwc
        # accept {module: pool} as a shorthand
        self.taps = {k: (v if isinstance(v, tuple) else (k, v)) for k, v in taps.items()}
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "TapRecorder":
        by_module: dict[str, list[tuple[str, str]]] = {}
        for name, (module, how) in self.taps.items():
            by_module.setdefault(module, []).append((name, how))
        modules = dict(self.model.named_modules())
        for module, wanted in by_module.items():
            is_input = module.endswith(bb.INPUT_SUFFIX)
            m = modules[module[: -len(bb.INPUT_SUFFIX)] if is_input else module]

            channels_last_map = bool(self.nhwc) and (module == self.nhwc or module.startswith(self.nhwc + "."))

            def record(t, wanted=wanted, cl=channels_last_map):
                for name, how in wanted:
                    if name not in self.out:  # first call wins for modules used twice
                        self.out[name] = pool(t, how, cl).float()
                if len(self.out) == len(self.taps):
                    raise _Done

            if is_input:
                h = m.register_forward_pre_hook(lambda mod, args, record=record: record(args[0]))
            else:
                h = m.register_forward_hook(lambda mod, args, out, record=record: record(out))
            self._handles.append(h)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.out = {}
        try:
            self.model(x)
        except _Done:
            pass
        missing = set(self.taps) - set(self.out)
        if missing:
            raise FeatxError(f"layers {sorted(missing)} were never called in the forward pass.")
        return self.out


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


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FeatxError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"--device {spec} asked for a GPU but torch sees none; use --device cpu.")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise FeatxError(f"--precision {precision!r} is not one of auto, fp32, bf16, fp16.")
    return table[precision]


class FeatureExtractor:
    """A frozen backbone with its taps, preprocessing and device: uint8 batches -> features.

    Args:
        config: the extraction settings.
    """

    def __init__(self, config: ExtractConfig):
        self.config = c = config
        bb.check_backbone(c.backbone)
        for p in c.pools:
            check_pool(p)
        self.device = resolve_device(c.device)
        self.weights = bb.resolve_weights(c.backbone, c.weights, c.seed)
        model = bb.load_backbone(c.backbone, self.weights)
        if c.preprocessing:
            self.pre = bb.Preprocess.from_json(c.preprocessing)
        else:
            self.pre = bb.preprocess_for(c.backbone, self.weights, c.image_size, c.grayscale)
            self.pre.jpeg_draft = c.jpeg_draft
        layers = list(c.layers) or [bb.default_tap(c.backbone, model)]
        layers = [bb.resolve_tap(c.backbone, model, layer) for layer in layers]
        self.layers = list(dict.fromkeys(layers))
        multi = len(c.pools) > 1
        self.taps = {(f"{layer}@{p}" if multi else layer): (layer, p) for layer in self.layers for p in c.pools}
        self.default_tap = next(iter(self.taps))
        for p in model.parameters():
            p.requires_grad_(False)
        self.channels_last = c.channels_last
        if c.batch_size is None:
            c.batch_size = 128 if self.device.type == "cuda" else 32
        self.amp = autocast_dtype(c.precision, self.device)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        mean = torch.tensor(self.pre.mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.pre.std, device=self.device).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean, std
        self.nhwc = bb.family_of(c.backbone).nhwc

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Features of a uint8 batch (N, 3, H, W) for every tap, as float32 arrays."""
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True).float().sub_(self._mean).div_(self._std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                with TapRecorder(self.model, self.taps, self.nhwc) as rec:
                    out = rec.run(x)
            return {k: v.float().cpu().numpy() for k, v in out.items()}

    def header(self, source: Source) -> dict:
        """Provenance attributes for the store; ``fingerprint`` decides resume compatibility."""
        c = self.config
        pooling = {name: pool_ for name, (_, pool_) in self.taps.items()}
        fingerprint = {
            "backbone": c.backbone, "weights": self.weights.id, "weights_sha256": self.weights.sha256,
            "weights_seed": self.weights.seed, "taps": self.taps, "preprocessing": json.loads(self.pre.to_json()), "dtype": c.dtype,
            "precision": str(self.amp), "batch_size": c.batch_size, "source": source_fingerprint(source),
        }
        return {
            "backbone": c.backbone,
            "weights": self.weights.id,
            "weights_sha256": self.weights.sha256,
            "weights_path": os.path.abspath(self.weights.path) if self.weights.path else "",
            **({"weights_seed": self.weights.seed} if self.weights.seed is not None else {}),
            "taps": json.dumps(self.taps),
            "pooling": json.dumps(pooling),
            "preprocessing": self.pre.to_json(),
            "precision": str(self.amp or "float32").replace("torch.", ""),
            "featx_version": featx.__version__,
            "torch_version": str(torch.__version__),
            "torchvision_version": torchvision.__version__,
            "command": " ".join(sys.argv),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": json.dumps(source.describe()),
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
        }

    def tap_info(self) -> dict[str, dict]:
        return {name: {"layer": layer, "pool": p} for name, (layer, p) in self.taps.items()}


def _workers(config: ExtractConfig, n: int) -> int:
    if config.workers is not None:
        return config.workers
    if n <= 2 * config.batch_size:
        return 0  # starting processes costs more than it saves
    return min(os.cpu_count() or 1, 8)


def iterate(source: Source, extractor: FeatureExtractor, items: range, progress: bool | None = None):
    """Yield ``(item indices, features dict, failures)`` per batch, in source order.

    Decoding runs in DataLoader workers (uint8 tensors cross the process boundary), the
    forward pass in this process, so decode and compute overlap.
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
    writer = StoreWriter(out, extractor.header(source), len(source), overwrite=overwrite)
    if writer.already_complete:
        n_rows, _ = _summary_of(out)
        return ExtractResult(str(out), len(source), n_rows, [], len(source), 0.0, True)
    items = items or range(len(source))
    b = config.batch_size
    shard_items = max(b, (shard_items or max(4096, b)) // b * b)
    done = writer.done_ranges()
    resumed = sum(min(e, items.stop) - max(s, items.start) for s, e in done if e > items.start and s < items.stop)
    failed_all: list[tuple[str, str]] = []
    for gap in gaps(done, items):
        # one DataLoader per gap (workers start once); a shard is cut every shard_items
        # items.  Boundaries are multiples of the batch size from the range start, so a
        # resumed run forms exactly the same batches as an uninterrupted one.
        taps, rows, fails, start = {k: [] for k in extractor.taps}, [], [], gap.start
        for batch_items, good, feats, bad in iterate(source, extractor, gap, config.progress):
            for k, v in (feats or {}).items():
                taps[k].append(v)
            rows += good
            fails += bad
            stop = batch_items[-1] + 1
            if stop - start >= shard_items or stop == gap.stop:
                arrays = {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in taps.items()}
                writer.write_shard(
                    start, stop, arrays, source.labels[rows], [source.ids[i] for i in rows],
                    [source.ids[i] for i, _ in fails], [e for _, e in fails],
                )
                failed_all += [(source.ids[i], e) for i, e in fails]
                taps, rows, fails, start = {k: [] for k in extractor.taps}, [], [], stop
    if finalize and not writer.missing():
        writer.finalize(source.classes, extractor.default_tap, extractor.tap_info(), config.dtype)
        n_rows, failed = _summary_of(out)
    else:
        n_rows, failed = -1, failed_all
    return ExtractResult(str(out), len(source), n_rows, failed, resumed, time.perf_counter() - t0)


def _summary_of(out) -> tuple[int, list[tuple[str, str]]]:
    """Rows and failures of a finished file (opened once)."""
    from featx.store import FeatureStore

    with FeatureStore(out) as fs:
        return len(fs), fs.failed
