"""Registry over torchvision's classification models: families, blocks, taps, skeletons.

For every model torchvision knows, featx needs three facts besides how to build it
(torchvision does that; where its weights come from is :mod:`featx.weights`): which
module's output is the default feature ("tap"), friendly names of taps, and the ordered
list of blocks, used both as taps by ``featx sweep``
and as the unit of freezing by ``featx finetune``.  Those facts differ per model *family*,
so they live in a table of :class:`Family` specs matched by name prefix, not in if/elif
chains.  Models of an unknown family still work: their default tap is the input of the
last ``nn.Linear`` and their blocks are the top-level children.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models

from featx.errors import FeatxError

INPUT_SUFFIX = ":input"  # a tap "name:input" records what enters module `name`


@dataclass(frozen=True)
class Block:
    """A contiguous group of modules, the unit of freezing and of layer sweeps."""

    tap: str  # module whose output is the block's feature map
    modules: tuple[str, ...]  # every top-level module name that belongs to the block


@dataclass(frozen=True)
class Family:
    """What featx knows about one family of torchvision models."""

    prefixes: tuple[str, ...]  # model names starting with one of these belong here
    default_tap: str | None  # None: the input of the last nn.Linear
    blocks: Callable[[nn.Module], list[Block]]  # ordered, input side first
    aliases: dict[str, str] = field(default_factory=dict)  # friendly tap names
    nhwc: str | None = None  # taps under this module are (N, H, W, C) maps (Swin's "features")


def _children_blocks(attr: str) -> Callable[[nn.Module], list[Block]]:
    """Every child of ``model.<attr>`` is a block (MobileNet, EfficientNet, ConvNeXt...)."""

    def blocks(model: nn.Module) -> list[Block]:
        parent = model.get_submodule(attr)
        return [Block(f"{attr}.{n}", (f"{attr}.{n}",)) for n, _ in parent.named_children()]

    return blocks


def _split_at_pools(model: nn.Module) -> list[Block]:
    """VGG / AlexNet: a conv block ends with its max-pooling layer."""
    out, current = [], []
    for n, m in model.features.named_children():
        current.append(f"features.{n}")
        if isinstance(m, nn.MaxPool2d):
            out.append(Block(current[-1], tuple(current)))
            current = []
    if current:
        out.append(Block(current[-1], tuple(current)))
    return out


def _named_blocks(*groups: tuple[str, ...]) -> Callable[[nn.Module], list[Block]]:
    """Fixed groups of top-level modules; the last module of a group is its tap."""

    def blocks(model: nn.Module) -> list[Block]:
        names = {n for n, _ in model.named_modules()}
        return [Block(g[-1], g) for g in groups if all(m in names for m in g)]

    return blocks


def _resnet_blocks(model: nn.Module) -> list[Block]:
    return [Block("maxpool", ("conv1", "bn1", "relu", "maxpool"))] + [
        Block(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)
    ]


def _densenet_blocks(model: nn.Module) -> list[Block]:
    f = "features"
    out = [Block(f"{f}.pool0", tuple(f"{f}.{n}" for n in ("conv0", "norm0", "relu0", "pool0")))]
    for i in range(1, 5):
        mods = [f"{f}.denseblock{i}"] + ([f"{f}.transition{i}"] if i < 4 else [f"{f}.norm5"])
        out.append(Block(mods[-1], tuple(mods)))
    return out


def _top_children(exclude: tuple[str, ...]) -> Callable[[nn.Module], list[Block]]:
    def blocks(model: nn.Module) -> list[Block]:
        return [
            Block(n, (n,))
            for n, m in model.named_children()
            if n not in exclude and any(True for _ in m.parameters())
        ]

    return blocks


def _fallback_blocks(model: nn.Module) -> list[Block]:
    children = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    return [Block(n, (n,)) for n in children[:-1]]


FAMILIES: tuple[Family, ...] = (
    Family(("vgg",), "features", _split_at_pools, {"fc6": "classifier.1", "fc7": "classifier.4"}),
    Family(("alexnet",), "features", _split_at_pools, {"fc6": "classifier.2", "fc7": "classifier.5"}),
    Family(("resnet", "resnext", "wide_resnet"), "avgpool", _resnet_blocks),
    Family(("mobilenet_v2",), "features", _children_blocks("features")),
    Family(("mobilenet_v3", "efficientnet", "convnext"), "avgpool", _children_blocks("features")),
    Family(("mnasnet",), "layers", _children_blocks("layers")),
    Family(("squeezenet",), "features", _children_blocks("features")),
    Family(("densenet",), "features", _densenet_blocks),
    Family(("inception_v3",), "avgpool", _top_children(("AuxLogits", "fc", "dropout", "avgpool"))),
    Family(("googlenet",), "avgpool", _top_children(("aux1", "aux2", "fc", "dropout", "avgpool"))),
    Family(("shufflenet",), "conv5", _named_blocks(("conv1", "maxpool"), ("stage2",), ("stage3",), ("stage4",), ("conv5",))),
    Family(("regnet",), "avgpool", _named_blocks(("stem",), ("trunk_output.block1",), ("trunk_output.block2",), ("trunk_output.block3",), ("trunk_output.block4",))),
    Family(("swin",), "avgpool", _children_blocks("features"), nhwc="features"),
    Family(("vit",), None, _children_blocks("encoder.layers")),
)


def family_of(name: str) -> Family:
    for fam in FAMILIES:
        if name.startswith(fam.prefixes):
            return fam
    return Family((name,), None, _fallback_blocks)


def available_backbones() -> list[str]:
    """Names of torchvision's classification models (the ones featx can use)."""
    return sorted(list_models(module=torchvision.models))


def check_backbone(name: str) -> None:
    names = available_backbones()
    if name not in names:
        close = [n for n in names if n.startswith(str(name)[:3])][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FeatxError(
            f"unknown backbone {name!r}{hint}; `featx backbones` lists the {len(names)} available."
        )


def last_linear(model: nn.Module) -> str:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise FeatxError("this backbone has no nn.Linear head; name a tap with --layer.")
    return name


def default_tap(name: str, model: nn.Module) -> str:
    fam = family_of(name)
    return fam.default_tap or last_linear(model) + INPUT_SUFFIX


def blocks_of(name: str, model: nn.Module) -> list[Block]:
    return family_of(name).blocks(model)


def resolve_tap(name: str, model: nn.Module, tap: str) -> str:
    """Map an alias (fc7) to a module name and check that the module exists."""
    tap = family_of(name).aliases.get(tap, tap)
    module = tap[: -len(INPUT_SUFFIX)] if tap.endswith(INPUT_SUFFIX) else tap
    if module not in dict(model.named_modules()) or module == "":
        raise FeatxError(
            f"backbone {name} has no layer {tap!r}; `featx backbones {name}` lists its layers."
        )
    return tap


# ----------------------------------------------------------------------------- building


def build(name: str, num_classes: int | None = None, state: dict | None = None, entry=None,
          origin: str = "these weights") -> nn.Module:
    """Build ``name``: random weights, or ``state`` loaded into a model shaped to receive it.

    Args:
        name: a torchvision model name.
        num_classes: outputs of the classifier (default: torchvision's, 1000).
        state: a state dict to load.
        entry: the torchvision weights entry the state comes from (ViT's image size).
        origin: where the state comes from, for the sentence that refuses it.
    """
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith("vit") and entry is not None:  # e.g. the 518-px SWAG weights of vit_h_14
        kwargs["image_size"] = entry.meta["min_size"][0]
    if name in ("inception_v3", "googlenet"):
        # ImageNet checkpoints of these two carry auxiliary heads and expect torchvision's
        # input re-normalisation; featx drops the heads after loading (never used in eval).
        aux = state is not None and any(k.startswith(("AuxLogits.", "aux1.")) for k in state)
        kwargs.update(aux_logits=aux, init_weights=False, transform_input=aux)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_model(name, weights=None, **kwargs)
    if state is not None:
        load_state(model, state, f"{origin} do not fit backbone {name}")
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model


def load_state(model: nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state)``; a state of another architecture is refused in one
    sentence that says how it differs (torch's own message lists every key on many lines)."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise FeatxError(f"{what}: {state_mismatch(model, state)}.") from None


def state_mismatch(model: nn.Module, state: dict) -> str:
    """How ``state`` differs from what ``model`` holds: missing, foreign and misshapen tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    foreign = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} tensors are not in the file (e.g. {missing[0]})")
    if foreign:
        parts.append(f"{len(foreign)} of the file's {len(state)} tensors are not the model's (e.g. {foreign[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} have another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                     f"{tuple(own[k].shape)} in the model)")
    return "; ".join(parts) or "the tensors do not load"


def skeleton(name: str, num_classes: int | None = None, entry=None) -> nn.Module:
    """The architecture of ``name`` without weights, for module names, blocks and shapes: on
    the meta device (no memory, no initialisation).  The few models whose construction reads
    tensor values (RegNet's block widths) cannot be built there: those are built on the CPU,
    initialised (slower; their real weights will need that memory anyway)."""
    check_backbone(name)
    try:
        with torch.device("meta"):
            return build(name, num_classes, None, entry)
    except NotImplementedError:  # "Cannot copy out of meta tensor"
        return build(name, num_classes, None, entry)
