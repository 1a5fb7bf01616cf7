"""Fine-tuning: train a new head, and optionally the last N blocks, with augmentation.

Strategies (``--unfreeze``): ``0`` trains only a new head on the frozen base; ``N`` also
trains the last N blocks of the backbone (blocks as its adapter defines them, see
``featx backbones NAME``); ``all`` trains the whole network with a small backbone
learning rate.  Parameters outside the head and the chosen blocks stay frozen, and the
BatchNorm layers among them stay in eval mode so their running statistics do not drift
(:mod:`featx.heads`).

The head alone is trained first for ``warmup_epochs`` (as fastai's ``fine_tune`` does),
then the chosen blocks join with learning rate ``lr * backbone_lr_mult``; one cosine
(or one-cycle) schedule spans all steps.  With ``progressive``, early epochs train on the
batches resized down (progressive resizing); the last epoch and validation use the full
size.  Every epoch writes metrics, a checkpoint to resume from, and, when validation
accuracy improves, the exported weights that ``featx extract --weights`` and ``featx
predict`` accept.  Shuffling and augmentation are functions of (seed, epoch,
image), so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import csv
import json
import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2 as T

from featx import adapters, plots
from featx.decode import Decoded, collate
from featx.device import autocast_dtype, resolve_device
from featx.errors import FeatxError, root_cause
from featx.files import atomic_open, check_output
from featx.graph import AUTO_MIN_TRAIN_IMAGES, COMPILE_MODES, own_forward, should_compile, strict_recompiles
from featx.heads import Head, apply_freeze, train_mode, trainable_prefixes
from featx.preprocess import Normalizer, Preprocess
from featx.sources import Source, open_splits
from featx.weights import save_finetuned, save_tensors

AUGMENTS = ("default", "light", "none")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle")
TTAS = ("none", "flip")
ONECYCLE_RISE = 0.25  # onecycle: the share of the steps over which the learning rate rises
ONECYCLE_START = 0.04  # ... from this fraction of its peak (1/25, as PyTorch's OneCycleLR)
# `--recipe fast`: what of fast-training recipes helped here (issue 22, BENCHMARKS.md "Fine-tuning,
# at the 0.95 line"): the one-cycle schedule and flip-averaged validation. A moving average of
# the weights (--ema) and progressive resizing (--progressive) were measured too and left out:
# the average scored below the trained weights in both runs, the smaller sizes saved little time
# on a CPU. Explicit options given with the recipe win.
RECIPES = {"fast": {"schedule": "onecycle", "tta": "flip"}}
# fields added after runs were first checkpointed: left out of a run's settings while they
# hold these defaults, so an older run resumes
NEWER_DEFAULTS = {"schedule": "cosine", "ema": 0.0, "tta": "none", "progressive": None}
PROGRESSIVE_STEP = 8  # --progressive: training sizes are the start size plus multiples of this


@dataclass
class FinetuneConfig:
    backbone: str = "resnet50"
    weights: str = "DEFAULT"
    unfreeze: str = "0"  # "0", "N" or "all"
    head: str = "linear"  # linear | mlp
    hidden: int = 512  # units of the MLP head's hidden layer
    dropout: float = 0.5
    epochs: int = 5
    warmup_epochs: int = 1  # head-only epochs before the blocks are unfrozen
    lr: float = 1e-3  # head learning rate
    backbone_lr_mult: float = 0.1  # backbone lr = lr * mult, in (0, 1]
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    augment: str = "default"  # default | light (flip + shear/zoom only) | none
    image_size: int | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    seed: int = 0
    compile: str = "auto"  # the training step through torch.compile: auto (long runs) | on | off
    schedule: str = "cosine"  # cosine over all steps | onecycle (a rise over the first quarter, then cosine)
    ema: float = 0.0  # decay per step of an exponential moving average of the weights (0: none); it is
    # what is validated and exported
    tta: str = "none"  # flip: validation, and the exported network in predict, average each image's
    # logits with its mirror image's
    progressive: int | None = None  # progressive resizing: the first epoch trains at this many pixels,
    # growing to the image size by the last epoch (which, and validation, run at the image size)


def transforms(pre: Preprocess, augment: str | bool):
    """Training augmentation: "default", "light" or "none"/False (validation's resize + crop)."""
    interp = T.InterpolationMode(pre.interpolation)
    plain = [T.Resize(pre.resize, interpolation=interp, antialias=True), T.CenterCrop(pre.crop)]
    if augment in (False, "none"):
        return T.Compose(plain)
    if augment == "light":  # the course's ImageDataGenerator: flip, shear, zoom; nothing cropped away
        return T.Compose(plain + [T.RandomHorizontalFlip(), T.RandomAffine(degrees=0, shear=10, scale=(0.9, 1.1))])
    # the course's RandomAffine shear/zoom and horizontal flip, plus random resized crop and
    # colour jitter
    return T.Compose([
        T.RandomResizedCrop(pre.crop, scale=(0.6, 1.0), interpolation=interp, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomAffine(degrees=0, shear=10, scale=(0.9, 1.1)),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])


class EpochShuffle(torch.utils.data.Sampler):
    """Batches of ``(index, epoch)`` in an order seeded by (seed, epoch).

    The DataLoader is built once (its workers persist); :meth:`set_epoch` moves to the next
    epoch's order, and the epoch travels with each index so the dataset can seed that
    image's augmentation.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle, self.epoch = n, batch_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = range(self.n)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()
        for s in range(0, self.n, self.batch_size):
            yield [(i, self.epoch) for i in order[s:s + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def _check(train: Source, val: Source | None, c: FinetuneConfig) -> None:
    if len(train) == 0:
        raise FeatxError("the training split is empty.")
    if (train.labels < 0).any():
        raise FeatxError("fine-tuning needs labelled images (class subfolders or a list with labels).")
    if len(np.unique(train.labels)) < 2:
        raise FeatxError("the training split has a single class; fine-tuning needs at least two.")
    if val is not None and len(val) == 0:
        raise FeatxError("the validation split is empty.")
    if val is not None and list(val.classes) != list(train.classes):
        raise FeatxError(f"validation classes {list(val.classes)[:5]}... differ from training classes "
                         f"{list(train.classes)[:5]}..., so their label numbers mean different classes (give every "
                         "split the same class folders).")
    for option, value, ok, allowed in (
            ("--lr", c.lr, c.lr > 0, "a positive number"),
            ("--backbone-lr-mult", c.backbone_lr_mult, 0 < c.backbone_lr_mult <= 1, "a value in (0, 1]"),
            ("--label-smoothing", c.label_smoothing, 0 <= c.label_smoothing < 1, "a value in [0, 1)"),
            ("weight_decay", c.weight_decay, c.weight_decay >= 0, "a number >= 0"),
            ("dropout", c.dropout, 0 <= c.dropout < 1, "a value in [0, 1)")):
        if not (math.isfinite(value) and ok):
            raise FeatxError(f"{option} {value} is out of range; use {allowed}.")
    if c.epochs < 1:
        raise FeatxError("--epochs must be at least 1.")
    if c.batch_size < 1 or c.hidden < 1 or c.warmup_epochs < 0:
        raise FeatxError("--batch-size and the hidden units must be at least 1, --warmup-epochs at least 0.")
    if c.augment not in AUGMENTS:
        raise FeatxError(f"--augment {c.augment!r} is not one of {', '.join(AUGMENTS)}.")
    if c.optimizer not in OPTIMIZERS:
        raise FeatxError(f"--optimizer {c.optimizer!r} is not one of {', '.join(OPTIMIZERS)}.")
    if c.compile not in COMPILE_MODES:
        raise FeatxError(f"--compile {c.compile!r} is not one of {', '.join(COMPILE_MODES)}.")
    if c.schedule not in SCHEDULES:
        raise FeatxError(f"--schedule {c.schedule!r} is not one of {', '.join(SCHEDULES)}.")
    if c.tta not in TTAS:
        raise FeatxError(f"--tta {c.tta!r} is not one of {', '.join(TTAS)}.")
    if not (math.isfinite(c.ema) and 0 <= c.ema < 1):
        raise FeatxError(f"--ema {c.ema} is out of range; use 0 (off) or a decay in (0, 1) such as 0.999.")
    if c.progressive is not None and c.progressive < PROGRESSIVE_STEP:
        raise FeatxError(f"--progressive {c.progressive} is too small; start at {PROGRESSIVE_STEP} pixels or more.")


def train_sizes(start: int | None, full: int, epochs: int) -> list[int]:
    """The square size each epoch trains at: ``full`` throughout, or (progressive resizing)
    from ``start`` growing linearly to ``full`` in steps of PROGRESSIVE_STEP pixels, the last
    epoch at ``full``. Few distinct sizes, so a compiled step is traced only a few times."""
    if start is None or epochs < 2:
        return [full] * epochs
    return [min(full, start + PROGRESSIVE_STEP * int((full - start) * e / (epochs - 1) / PROGRESSIVE_STEP + 0.5))
            for e in range(epochs - 1)] + [full]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """torch's generators (the CPU's, and the device's) seeded for the duration and put back
    after: the run's random draws (the new head's initialisation, dropout) are the same on
    every run and after a resume, and nothing outside the run is reseeded."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_size(model: nn.Module, start: int, full: int, backbone: str) -> None:
    """Refuse a progressive start size above the image size, or one the network cannot take
    (a transformer made for one size), before any training."""
    if start > full:
        raise FeatxError(f"--progressive {start} is larger than the image size {full}; start smaller, or give a "
                         "larger --image-size.")
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, start, start, device=next(model.parameters()).device))
    except Exception as e:  # noqa: BLE001 - one sentence, before any training
        raise FeatxError(f"--progressive {start}: {backbone} does not take {start} px images ({root_cause(e)}); "
                         "leave --progressive out.") from None
    finally:
        model.train(was)


class Diverged(FeatxError):
    """Training produced a non-finite loss or non-finite weights."""


class Trainer:
    """One fine-tuning run: the network, its optimiser and schedule, its data loaders."""

    def __init__(self, train: Source, val: Source | None, config: FinetuneConfig):
        c = self.config = config
        self.train_src, self.val_src = train, val
        self.device = resolve_device(c.device)
        bk = adapters.backbone(c.backbone)
        model, weights = bk.load(bk.resolve_weights(c.weights, c.seed))
        self.pre = adapters.preprocessing(bk, weights, c.image_size)
        self.sizes = train_sizes(c.progressive, self.pre.crop, c.epochs)
        if c.progressive is not None:
            _check_size(model, c.progressive, self.pre.crop, c.backbone)
        self.classes = list(train.classes)
        with seeded(c.seed, self.device):  # the new head's initialisation
            self.head: Head = bk.replace_head(model, len(self.classes), c.head, c.hidden, c.dropout)
        self.prefixes = trainable_prefixes(c.backbone, bk.blocks(model), c.unfreeze, self.head.module)
        self.amp = autocast_dtype("auto", self.device)  # bf16 (or fp16) on CUDA, none on CPU
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.normalize = Normalizer(self.pre, self.device, channels_last=True)
        self.opt, self.base_lrs, has_base = self._optimizer()
        self.warmup = min(c.warmup_epochs, c.epochs - 1) if has_base else 0
        self.total_steps = math.ceil(len(train) / c.batch_size) * c.epochs
        self.scaler = torch.amp.GradScaler(enabled=self.amp == torch.float16)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        self.train_loader = self._loader(train, transforms(self.pre, c.augment) if c.augment != "none" else None, True)
        self.val_loader = self._loader(val, None, False) if val is not None else None
        # The training forward (and so its backward) as a compiled graph; the model itself
        # stays the eager module: its state_dict, validation and export are unchanged.
        compiled = should_compile(c.compile, self.device, len(train) * c.epochs, AUTO_MIN_TRAIN_IMAGES)
        self.forward = torch.compile(own_forward(self.model)) if compiled else self.model
        # --ema: a moving average of the weights and BatchNorm statistics, updated after every
        # step, never trained itself; it is what validation sees and export writes
        self.ema = None
        if c.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(c.ema), use_buffers=True)

    @property
    def evaluated(self) -> nn.Module:
        """The network validation scores and export writes: the moving average, or the model."""
        return self.ema.module if self.ema is not None else self.model

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of its peak: cosine down over all steps,
        or (onecycle) a linear rise from ONECYCLE_START over the first ONECYCLE_RISE of them,
        then cosine down."""
        if self.config.schedule == "onecycle":
            rise = max(1, int(ONECYCLE_RISE * self.total_steps))
            if step < rise:
                return ONECYCLE_START + (1 - ONECYCLE_START) * step / rise
            return 0.5 * (1 + math.cos(math.pi * (step - rise) / max(1, self.total_steps - rise)))
        return 0.5 * (1 + math.cos(math.pi * step / self.total_steps))

    def _optimizer(self):
        c, head = self.config, self.head.module
        head_params = [p for n, p in self.model.named_parameters() if n == head or n.startswith(head + ".")]
        head_ids = {id(p) for p in head_params}
        apply_freeze(self.model, self.prefixes)
        base_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [{"params": head_params, "lr": c.lr}]
        if base_params:
            groups.append({"params": base_params, "lr": c.lr * c.backbone_lr_mult})
        if c.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=c.weight_decay, nesterov=True)
        return opt, [g["lr"] for g in opt.param_groups], bool(base_params)

    def _loader(self, source: Source, transform, shuffle: bool):
        c = self.config
        n_workers = c.workers if c.workers is not None else min(os.cpu_count() or 1, 8)
        data = Decoded(source, self.pre, transform=transform, seed=c.seed)
        sampler = EpochShuffle(len(source), c.batch_size, c.seed, shuffle)
        # a generator of its own: the workers' base seed is not drawn from the global one
        return torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=n_workers, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(c.seed),
                                           pin_memory=self.device.type == "cuda", persistent_workers=n_workers > 0)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def train_epoch(self, epoch: int, step: int, max_steps: int | None = None) -> tuple[dict, int]:
        """One pass over the training images; returns the epoch's row and the step count."""
        c, head_only = self.config, epoch < self.warmup
        apply_freeze(self.model, [self.head.module] if head_only else self.prefixes)
        train_mode(self.model)
        self.train_loader.batch_sampler.set_epoch(epoch)
        with seeded(c.seed * 1000 + epoch, self.device):  # dropout: the same draws after a resume
            return self._train_epoch(epoch, step, head_only, max_steps)

    def _train_epoch(self, epoch: int, step: int, head_only: bool, max_steps: int | None) -> tuple[dict, int]:
        c, size = self.config, self.sizes[epoch]
        loss_sum, correct, n = 0.0, 0, 0
        for x, good, _ in self.train_loader:
            if x is None:
                continue
            factor = self.lr_factor(step)
            for g, lr0 in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = lr0 * factor
            y = torch.as_tensor(self.train_src.labels[good], device=self.device)
            self.opt.zero_grad(set_to_none=True)
            try:
                logits, loss = self._step(x, y, size)
            except Exception as e:  # noqa: BLE001 - a compiler failure: this step again, eagerly
                if self.forward is self.model:
                    raise
                warnings.warn(f"compiling the training step failed ({root_cause(e)}); training eagerly.", stacklevel=2)
                self.forward = self.model
                self.opt.zero_grad(set_to_none=True)
                logits, loss = self._step(x, y, size)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise Diverged(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}")
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            step += 1
            loss_sum += value * len(good)
            correct += int((logits.argmax(1) == y).sum())
            n += len(good)
            if max_steps is not None and step >= max_steps:
                break
        row = {"epoch": epoch + 1, "phase": "head" if head_only else f"unfreeze {c.unfreeze}",
               "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1)}
        if c.progressive is not None:
            row["train_size"] = size
        return row, step

    def _step(self, x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one batch, resized to ``size`` pixels (progressive
        resizing) if it is not that size already; returns the logits and the loss."""
        x = self.normalize(x)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False).contiguous(memory_format=torch.channels_last)
        with self._autocast(), strict_recompiles():
            logits = self.forward(x)
            loss = self.loss_fn(logits.float(), y)
        self.scaler.scale(loss).backward()
        return logits, loss

    def validate(self) -> tuple[float, float]:
        """Loss and accuracy on the validation images (plain resize + centre crop) of the
        evaluated network; with ``tta`` flip, of each image's and its mirror's mean logits."""
        model = self.evaluated
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.inference_mode(), self._autocast():
            for x, good, _ in self.val_loader:
                if x is None:
                    continue
                y = torch.as_tensor(self.val_src.labels[good], device=self.device)
                x = self.normalize(x)
                logits = model(x).float()
                if self.config.tta == "flip":
                    logits = (logits + model(x.flip(-1)).float()) / 2
                loss = float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                if not math.isfinite(loss):
                    raise Diverged(f"the validation loss is {loss}")
                loss_sum += loss
                correct += int((logits.argmax(1) == y).sum())
                n += len(good)
        return loss_sum / max(n, 1), correct / max(n, 1)

    def check_finite(self) -> None:
        """Raise :class:`Diverged` if any trained parameter is not finite."""
        for name, p in self.model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise Diverged(f"parameter {name} is not finite")

    def export(self, out: Path, row: dict) -> None:
        """backbone.pt + backbone.json: what ``extract --weights`` and ``predict`` read."""
        c = self.config
        meta = {"backbone": c.backbone, "num_classes": len(self.classes), "classes": self.classes, "head": c.head,
                "hidden": c.hidden, "head_module": self.head.module, "logits_module": self.head.logits,
                "preprocessing": self.pre.to_json(), "unfreeze": c.unfreeze, "epoch": row["epoch"],
                "val_acc": row.get("val_acc"), "base_weights": c.weights, "tta": c.tta, "ema": c.ema,
                "progressive": c.progressive}
        save_finetuned(out, self.evaluated.state_dict(), meta)

    def checkpoint(self) -> dict:
        ck = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        if self.ema is not None:
            ck["ema"] = self.ema.state_dict()
        return ck

    def restore(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema"])


def finetune(train: Source, val: Source | None, out: str | os.PathLike, config: FinetuneConfig,
             resume: bool = False, log=print, max_steps: int | None = None) -> dict:
    """Fine-tune ``config.backbone`` on ``train``; write metrics, checkpoints and weights to ``out``.

    Args:
        train, val: labelled image sources (val may be None: then no best-model selection
            by validation; the last epoch is exported).
        out: run directory.
        config: the strategy and hyper-parameters.
        resume: continue from ``out/checkpoint.pt``.
        log: where the per-epoch lines go.
        max_steps: stop after this many optimiser steps in total (tests).
    """
    c = config
    _check(train, val, c)
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    cfg_json = json.dumps({k: v for k, v in asdict(c).items()  # the same maths; an older run's settings stay
                           if k != "compile" and not (k in NEWER_DEFAULTS and v == NEWER_DEFAULTS[k])}, sort_keys=True)
    if not resume and ckpt_path.exists():
        raise FeatxError(f"{out} holds a run already; use --resume to continue it, or another --out.")
    if resume and not ckpt_path.exists():
        raise FeatxError(f"--resume: no checkpoint in {out}.")
    check_output(out, folder=True, what="--out")
    trainer = Trainer(train, val, c)
    start_epoch, step, best_acc, history = 0, 0, -1.0, []
    if resume:
        try:
            ck = torch.load(ckpt_path, map_location=trainer.device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - cut short or damaged: say so, never a traceback
            raise FeatxError(f"--resume: {ckpt_path} cannot be read ({root_cause(e)}); start again in another --out "
                             "(backbone.pt there is the best epoch so far).") from None
        if ck["config"] != cfg_json:
            raise FeatxError(f"--resume: {out} was started with other settings; use the same options or another --out.")
        trainer.restore(ck)
        start_epoch, step, best_acc, history = ck["epoch"] + 1, ck["step"], ck["best_acc"], json.loads(ck["history"])
        log(f"resuming after epoch {ck['epoch'] + 1} of {c.epochs}")
    for epoch in range(start_epoch, c.epochs):
        t0 = time.perf_counter()
        try:
            row, step = trainer.train_epoch(epoch, step, max_steps)
            if val is not None:
                row["val_loss"], row["val_acc"] = trainer.validate()
            trainer.check_finite()
        except Diverged as e:
            kept = (f"the files of epoch {len(history)} in {out} are kept as they were" if history
                    else f"nothing was written to {out}")
            raise FeatxError(f"training diverged: {e} (is --lr {c.lr:g} too high?); {kept}.") from None
        row["seconds"] = time.perf_counter() - t0
        row["images_per_s"] = len(train) / row["seconds"]
        history.append(row)
        at = f", {row['train_size']} px" if "train_size" in row else ""
        log(f"epoch {epoch + 1}/{c.epochs} [{row['phase']}{at}] train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.4f}" + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
                                          if val is not None else "") + f" ({row['seconds']:.0f}s)")
        score = row.get("val_acc", epoch)
        if score > best_acc:
            best_acc = score
            trainer.export(out, row)
        _write_metrics(out, history)
        save_tensors({**trainer.checkpoint(), "epoch": epoch, "step": step, "best_acc": best_acc,
                      "history": json.dumps(history), "config": cfg_json}, ckpt_path)
        if max_steps is not None and step >= max_steps:
            break
    return {"history": history, "best": best_acc, "weights": str(out / "backbone.pt")}


def _write_metrics(out: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_open(out / "metrics.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    plots.training_curves(out / "training_curves.png", history)


def finetune_data(data: str, out: str | os.PathLike, config: FinetuneConfig, split: str | None = None,
                  val_split: str | None = None, root: str | None = None, val_fraction: float = 0.2,
                  resume: bool = False, log=print, say=None) -> dict:
    """``featx finetune DATA``: the training and validation images as sweep finds them
    (:func:`featx.sources.open_splits`, announced through ``say``, default ``log``), then
    :func:`finetune`."""
    adapters.backbone(config.backbone)  # checked before anything is read
    splits = open_splits(data, split, val_split, root, val_fraction, config.seed)
    (say or log)(splits.note)
    return finetune(splits.train, splits.val, out, config, resume=resume, log=log)
