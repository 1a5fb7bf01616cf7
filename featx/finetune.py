"""Fine-tuning: train a new head, and optionally the last N blocks, with augmentation.

Strategies (``--unfreeze``): ``0`` trains only a new head on the frozen base; ``N`` also
trains the last N blocks of the backbone (blocks as the registry defines them, see
``featx backbones NAME``); ``all`` trains the whole network with a small backbone
learning rate.  Parameters outside the head and the chosen blocks stay frozen, and the
BatchNorm layers among them stay in eval mode so their running statistics do not drift.

The head alone is trained first for ``warmup_epochs`` (as fastai's ``fine_tune`` does),
then the chosen blocks join with learning rate ``lr * backbone_lr_mult``; one cosine
schedule spans all steps.  Every epoch writes metrics, a checkpoint to resume from, and,
when validation accuracy improves, the exported weights that ``featx extract --weights``
and ``featx predict`` accept.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2 as T

from featx import backbones as bb
from featx.errors import FeatxError
from featx.sources import Source, collate, to_rgb


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


# -- model surgery --------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_head(name: str, model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                 dropout: float = 0.5) -> str:
    """Replace the ImageNet classifier's last Linear with a new head; return its module name."""
    last = bb.last_linear(model)
    in_features = model.get_submodule(last).in_features
    if head == "linear":
        new = nn.Linear(in_features, num_classes)
    elif head == "mlp":
        new = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                            nn.Linear(hidden, num_classes))
    else:
        raise FeatxError(f"--head {head!r} is not one of linear, mlp.")
    _set_module(model, last, new)
    return last


def trainable_prefixes(name: str, model: nn.Module, unfreeze: str, head: str) -> list[str] | None:
    """Module-name prefixes to train (None: everything)."""
    if unfreeze == "all":
        return None
    try:
        n = int(unfreeze)
    except ValueError:
        raise FeatxError(f"--unfreeze {unfreeze!r} must be 0, a number of blocks, or all.") from None
    blocks = bb.blocks_of(name, model)
    if n < 0 or n > len(blocks):
        raise FeatxError(f"--unfreeze {n}: {name} has {len(blocks)} blocks "
                         f"({blocks[0].tap} ... {blocks[-1].tap}); use 0..{len(blocks)} or all.")
    chosen = [m for b in blocks[len(blocks) - n:] for m in b.modules] if n else []
    return chosen + [head]


def apply_freeze(model: nn.Module, prefixes: list[str] | None) -> None:
    for pname, p in model.named_parameters():
        p.requires_grad_(prefixes is None or any(pname == q or pname.startswith(q + ".") for q in prefixes))


def train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm layers whose parameters are frozen: they keep their statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


# -- data -----------------------------------------------------------------------------


class TrainImages(torch.utils.data.Dataset):
    """A source as uint8 tensors through a PIL transform; decode errors become values."""

    def __init__(self, source: Source, transform, grayscale: bool = False):
        self.source, self.transform, self.grayscale = source, transform, grayscale

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            img = to_rgb(self.source.open(i))
            if self.grayscale:
                img = img.convert("L").convert("RGB")
            return T.functional.pil_to_tensor(self.transform(img)), i, None
        except Exception as e:
            return None, i, f"{type(e).__name__}: {e}"


def transforms(pre: bb.Preprocess, augment: str | bool):
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


# -- training -------------------------------------------------------------------------


def _check_data(train: Source, val: Source | None) -> None:
    if len(train) == 0:
        raise FeatxError("the training split is empty.")
    if (train.labels < 0).any():
        raise FeatxError("fine-tuning needs labelled images (class subfolders or a list with labels).")
    if len(np.unique(train.labels)) < 2:
        raise FeatxError("the training split has a single class; fine-tuning needs at least two.")
    if val is not None and len(val) == 0:
        raise FeatxError("the validation split is empty.")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    _check_data(train, val)
    if not 0 < c.backbone_lr_mult <= 1:
        raise FeatxError(f"--backbone-lr-mult {c.backbone_lr_mult} is out of range; use a value in (0, 1].")
    if c.epochs < 1:
        raise FeatxError("--epochs must be at least 1.")
    if c.augment not in ("default", "light", "none"):
        raise FeatxError(f"--augment {c.augment!r} is not one of default, light, none.")
    from featx.extract import autocast_dtype, resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = resolve_device(c.device)
    _seed_all(c.seed)
    weights = bb.resolve_weights(c.backbone, c.weights, c.seed)
    model = bb.load_backbone(c.backbone, weights)
    pre = bb.preprocess_for(c.backbone, weights, c.image_size)
    classes = list(train.classes)
    head = replace_head(c.backbone, model, len(classes), c.head, c.hidden, c.dropout)
    prefixes = trainable_prefixes(c.backbone, model, c.unfreeze, head)
    amp = autocast_dtype("auto", device)  # bf16 (or fp16) on CUDA, none on CPU
    model = model.to(device, memory_format=torch.channels_last)

    head_params = [p for n, p in model.named_parameters() if n == head or n.startswith(head + ".")]
    head_ids = {id(p) for p in head_params}
    apply_freeze(model, prefixes)
    base_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "lr": c.lr}]
    if base_params:
        groups.append({"params": base_params, "lr": c.lr * c.backbone_lr_mult})
    if c.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
    elif c.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=c.weight_decay, nesterov=True)
    else:
        raise FeatxError(f"--optimizer {c.optimizer!r} is not one of adamw, sgd.")
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(len(train) / c.batch_size)
    total = steps_per_epoch * c.epochs
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
    warmup = min(c.warmup_epochs, c.epochs - 1) if base_params else 0

    start_epoch, step, best_acc, history = 0, 0, -1.0, []
    cfg_json = json.dumps(asdict(c), sort_keys=True)
    if resume:
        if not ckpt_path.exists():
            raise FeatxError(f"--resume: no checkpoint in {out}.")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck["config"] != cfg_json:
            raise FeatxError(f"--resume: {out} was started with other settings; use the same options or another --out.")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, step, best_acc, history = ck["epoch"] + 1, ck["step"], ck["best_acc"], json.loads(ck["history"])
        log(f"resuming after epoch {ck['epoch'] + 1} of {c.epochs}")
    elif ckpt_path.exists():
        raise FeatxError(f"{out} holds a run already; use --resume to continue it, or another --out.")

    def batches(source, transform, shuffle, epoch):
        ds = TrainImages(source, transform)
        g = torch.Generator().manual_seed(c.seed * 1000 + epoch)  # same order after a resume
        n_workers = c.workers if c.workers is not None else min(os.cpu_count() or 1, 8)
        return torch.utils.data.DataLoader(ds, batch_size=c.batch_size, shuffle=shuffle, generator=g,
                                           num_workers=n_workers, collate_fn=collate,
                                           pin_memory=device.type == "cuda", drop_last=False)

    def prepare(x):
        x = x.to(device, non_blocking=True).float().sub_(mean).div_(std)
        return x.contiguous(memory_format=torch.channels_last)

    def evaluate(source):
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for x, good, _ in batches(source, transforms(pre, "none"), False, 0):
                if x is None:
                    continue
                y = torch.as_tensor(source.labels[good], device=device)
                logits = model(prepare(x)).float()
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                n += len(good)
        return loss_sum / max(n, 1), correct / max(n, 1)

    train_tf = transforms(pre, c.augment)
    for epoch in range(start_epoch, c.epochs):
        t0 = time.perf_counter()
        head_only = epoch < warmup
        apply_freeze(model, [head] if head_only else prefixes)
        train_mode(model)
        loss_sum, correct, n = 0.0, 0, 0
        _seed_all(c.seed * 1000 + epoch)
        for x, good, bad in batches(train, train_tf, True, epoch):
            if x is None:
                continue
            factor = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine over all steps
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 * factor
            y = torch.as_tensor(train.labels[good], device=device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(prepare(x))
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum += float(loss.detach()) * len(good)
            correct += int((logits.argmax(1) == y).sum())
            n += len(good)
            if max_steps is not None and step >= max_steps:
                break
        row = {"epoch": epoch + 1, "phase": "head" if head_only else f"unfreeze {c.unfreeze}",
               "train_loss": loss_sum / max(n, 1), "train_acc": correct / max(n, 1), "seconds": 0.0}
        if val is not None:
            row["val_loss"], row["val_acc"] = evaluate(val)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log(f"epoch {epoch + 1}/{c.epochs} [{row['phase']}] train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.4f}" + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
                                          if val is not None else "") + f" ({row['seconds']:.0f}s)")
        score = row.get("val_acc", epoch)
        if score > best_acc:
            best_acc = score
            export(out, model, c, pre, classes, head, row)
        _write_metrics(out, history)
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                      "best_acc": best_acc, "history": json.dumps(history), "config": cfg_json}, ckpt_path)
        if max_steps is not None and step >= max_steps:
            break
    return {"history": history, "best": best_acc, "weights": str(out / "backbone.pt")}


def export(out: Path, model: nn.Module, c: FinetuneConfig, pre: bb.Preprocess, classes: list[str], head: str,
           row: dict) -> None:
    """backbone.pt (state dict + featx metadata, loadable with weights_only) and backbone.json."""
    meta = {"featx": "finetune", "backbone": c.backbone, "num_classes": len(classes), "classes": classes,
            "head": c.head, "hidden": c.hidden, "head_module": head, "preprocessing": pre.to_json(), "unfreeze": c.unfreeze,
            "epoch": row["epoch"], "val_acc": row.get("val_acc"), "base_weights": c.weights}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_save({"state_dict": state, "featx": meta}, out / "backbone.pt")
    (out / "backbone.json").write_text(json.dumps(meta, indent=1))


def _write_metrics(out: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    a2.plot(ep, [r["train_acc"] for r in history], "o-", label="train")
    if "val_loss" in history[0]:
        a1.plot(ep, [r["val_loss"] for r in history], "o-", label="validation")
        a2.plot(ep, [r["val_acc"] for r in history], "o-", label="validation")
    a1.set_title("loss")
    a2.set_title("accuracy")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)
