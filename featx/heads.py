"""Model surgery for fine-tuning: a new head, which blocks train, and BatchNorm modes.

Blocks are the backbone adapter's (:mod:`featx.adapters`), so ``--unfreeze N`` means the
same blocks that ``featx backbones NAME`` lists and ``featx sweep`` probes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from featx import registry
from featx.errors import FeatxError

HEADS = ("linear", "mlp")


@dataclass(frozen=True)
class Head:
    """Where the new head sits in the network."""

    module: str  # the module that replaced the ImageNet classifier's last Linear
    logits: str  # the module whose output is the class scores (the head's last Linear)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_head(model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                 dropout: float = 0.5) -> Head:
    """Replace the ImageNet classifier's last Linear with a new ``linear`` or ``mlp`` head."""
    last = registry.last_linear(model)
    in_features = model.get_submodule(last).in_features
    if head == "linear":
        return _install(model, last, nn.Linear(in_features, num_classes))
    if head == "mlp":
        return _install(model, last, mlp(in_features, num_classes, hidden, dropout))
    raise FeatxError(f"--head {head!r} is not one of {', '.join(HEADS)}.")


def mlp(in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.5) -> nn.Sequential:
    """featx's MLP head: Linear, ReLU, Dropout, Linear (the class scores)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, num_classes))


def _install(model: nn.Module, name: str, new: nn.Module) -> Head:
    _set_module(model, name, new)
    logits = name
    if isinstance(new, nn.Sequential):
        logits = f"{name}.{len(new) - 1}"
    return Head(name, logits)


def trainable_prefixes(name: str, blocks: list[registry.Block], unfreeze: str, head: str) -> list[str] | None:
    """Module-name prefixes to train: the head and the last ``unfreeze`` of the backbone
    ``name``'s ``blocks`` (None: everything)."""
    if unfreeze == "all":
        return None
    try:
        n = int(unfreeze)
    except ValueError:
        raise FeatxError(f"--unfreeze {unfreeze!r} must be 0, a number of blocks, or all.") from None
    if n < 0 or n > len(blocks):
        span = f" ({blocks[0].tap} ... {blocks[-1].tap})" if blocks else ""
        raise FeatxError(f"--unfreeze {n}: {name} has {len(blocks)} blocks{span}; use 0..{len(blocks)} or all.")
    chosen = [m for b in blocks[len(blocks) - n:] for m in b.modules] if n else []
    return chosen + [head]


def apply_freeze(model: nn.Module, prefixes: list[str] | None) -> None:
    """Parameters under ``prefixes`` train, all others are frozen (None: all train)."""
    for pname, p in model.named_parameters():
        p.requires_grad_(prefixes is None or any(pname == q or pname.startswith(q + ".") for q in prefixes))


def train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm layers whose parameters are frozen: they keep their statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
