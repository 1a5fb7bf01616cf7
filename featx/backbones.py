"""Registry over torchvision's classification models.

For every model torchvision knows, featx needs four facts: how to build it (torchvision
does that), which weights exist (torchvision's weights enums), which module's output is the
default feature ("tap"), and the ordered list of blocks, used both as taps by ``featx sweep``
and as the unit of freezing by ``featx finetune``.  Those facts differ per model *family*,
so they live in a table of :class:`Family` specs matched by name prefix, not in if/elif
chains.  Models of an unknown family still work: their default tap is the input of the
last ``nn.Linear`` and their blocks are the top-level children.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import urllib.error
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

from featx.errors import FeatxError

# torch.hub's own rule: the sha256 prefix sits between the last '-' and the extension.
HASH_REGEX = re.compile(r"-([a-f0-9]{6,})\.")

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


# ----------------------------------------------------------------------------- weights


@dataclass
class Preprocess:
    """How an image becomes the network's input (derived from ``weights.transforms()``)."""

    resize: int  # shorter side is resized to this many pixels
    crop: int  # then a centred crop of crop x crop pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    grayscale: bool = False  # convert every image to gray (replicated to 3 channels)
    jpeg_draft: bool = True  # let libjpeg decode large JPEGs at a reduced scale

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass
class Weights:
    """Which weights a backbone carries, and where they came from."""

    id: str  # "MobileNet_V2_Weights.IMAGENET1K_V1", "none", or "file:<name>"
    sha256: str  # of the file the weights were read from; random weights: of the parameters made
    enum: object | None  # the torchvision weights entry, when one applies
    path: str | None = None  # the file, when one was given
    meta: dict | None = None  # featx fine-tuning metadata embedded in the file
    seed: int | None = None  # random weights: the seed of their initialisation


def _weights_enum(name: str):
    try:
        return get_model_weights(name)
    except (ValueError, KeyError):
        return None


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_file(entry) -> Path:
    return hub_checkpoint_dir() / os.path.basename(entry.url)


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def known_weight_files() -> dict[str, tuple[str, object]]:
    """basename of every torchvision weights URL -> (model name, weights entry)."""
    out = {}
    for model in available_backbones():
        enum = _weights_enum(model)
        for entry in enum or ():
            out.setdefault(os.path.basename(entry.url), (model, entry))
    return out


def check_file_hash(path: str | os.PathLike) -> str:
    """Return the file's sha256; raise if its name carries a prefix the content does not match."""
    digest = sha256_of(path)
    m = HASH_REGEX.search(os.path.basename(str(path)))
    if m and not digest.startswith(m.group(1)):
        raise FeatxError(
            f"weights file {path} is corrupt or altered: its name promises sha256 {m.group(1)}..."
            f" but its content hashes to {digest[:12]}..."
        )
    return digest


def read_tensors(path: str | os.PathLike):
    """``torch.load(weights_only=True)``: tensors and plain containers, never code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message advises weights_only=False, i.e. running the file's code:
        # featx never does that, so it says what is wrong in its own words
        why = ("it holds Python objects besides tensors, and featx never unpickles those"
               if "GLOBAL" in str(e) else "it is not a PyTorch weights file (a state dict saved with torch.save)")
        raise FeatxError(f"cannot read weights file {path}: {why}.") from None


def resolve_weights(name: str, spec: str | None, seed: int = 0) -> Weights:
    """Interpret ``--weights``: DEFAULT, an enum member name, ``none``, or a file path.

    ``seed`` seeds the initialisation of random weights (``none``), so that the same
    command makes the same network every time.
    """
    enum = _weights_enum(name)
    spec = spec or "DEFAULT"
    if spec.lower() == "none":
        return Weights("none", "", None, seed=int(seed))
    if os.path.exists(spec):
        return Weights(f"file:{os.path.basename(spec)}", "", None, path=spec)
    member = spec.split(".")[-1]
    if enum is not None:
        if member == "DEFAULT":
            entry = enum.DEFAULT
        elif member in enum.__members__:
            entry = enum[member]
        else:
            entry = None
        if entry is not None and (spec.count(".") == 0 or spec.split(".")[0] == enum.__name__):
            return Weights(f"{enum.__name__}.{entry.name}", "", entry)
    allowed = ["DEFAULT", "none", "a file path"] + list(enum.__members__ if enum else [])
    raise FeatxError(f"--weights {spec!r} is neither a file nor a weights name of {name}; allowed: {', '.join(allowed)}.")


def _build(name: str, num_classes: int | None, state: dict | None = None, entry=None) -> nn.Module:
    """Build ``name`` with random weights, shaped to receive ``state`` when one is given."""
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
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise FeatxError(f"these weights do not fit backbone {name}: {str(e).splitlines()[0]}") from None
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model


def load_backbone(name: str, weights: Weights) -> nn.Module:
    """Build the model and load its weights; the model is returned in eval mode on the CPU.

    Named weights go through torchvision's own API (download when online, the standard
    TORCH_HOME cache, hash check).  A file is read with ``torch.load(weights_only=True)``,
    so it can hold tensors and plain containers but never run code.
    """
    check_backbone(name)
    if weights.enum is not None:
        entry = weights.enum
        try:
            state = torch.hub.load_state_dict_from_url(entry.url, progress=False, check_hash=True)
        except (urllib.error.URLError, OSError) as e:
            raise FeatxError(
                f"weights {weights.id} are not in the torch hub cache ({hub_checkpoint_dir()}) and could "
                f"not be downloaded ({e}); copy the file {os.path.basename(entry.url)} there with "
                "`featx weights import FILE`, or use --weights PATH or --weights none."
            ) from None
        except RuntimeError as e:  # torch.hub's hash mismatch
            raise FeatxError(f"weights {weights.id} failed their hash check: {e}") from None
        weights.sha256 = sha256_of(cached_file(entry))
        model = _build(name, len(entry.meta["categories"]), state, entry)
    elif weights.path is not None:
        weights.sha256 = check_file_hash(weights.path)
        obj = read_tensors(weights.path)
        if isinstance(obj, dict) and "featx" in obj and "state_dict" in obj:
            weights.meta = obj["featx"]
            obj = obj["state_dict"]
        known = known_weight_files().get(os.path.basename(weights.path))
        if known is not None and known[0] == name:
            weights.enum = known[1]
            weights.id = f"{type(known[1]).__name__}.{known[1].name}"
        if not isinstance(obj, dict):
            raise FeatxError(f"weights file {weights.path} holds a {type(obj).__name__}, not a state dict.")
        num_classes = None
        for key in reversed(list(obj)):
            if key.endswith("weight") and obj[key].ndim == 2:  # the last Linear: the head
                num_classes = obj[key].shape[0]
                break
        if weights.meta and weights.meta.get("head") == "mlp":
            from featx.finetune import replace_head  # a fine-tuned MLP head has extra layers

            model = _build(name, None)
            replace_head(name, model, weights.meta["num_classes"], "mlp", weights.meta.get("hidden", 512))
            try:
                model.load_state_dict(obj)
            except RuntimeError as e:
                raise FeatxError(f"weights file {weights.path} does not fit backbone {name}: {str(e).splitlines()[0]}") from None
        else:
            model = _build(name, num_classes, obj, weights.enum)
    else:
        # seeded, so that a rerun (or a resumed run) makes the same network; the
        # digest of the parameters lets a later run check that it made it again
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed or 0)
            model = _build(name, None)
        weights.sha256 = state_digest(model.state_dict())
    return model.eval()


def state_digest(state: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors, in order."""
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def preprocess_for(name: str, weights: Weights, image_size: int | None = None, grayscale: bool = False) -> Preprocess:
    """Preprocessing from the weights' own ``transforms()``, with featx's overrides."""
    if weights.meta and "preprocessing" in weights.meta:
        pre = Preprocess.from_json(weights.meta["preprocessing"])
    else:
        entry = weights.enum or (_weights_enum(name).DEFAULT if _weights_enum(name) else None)
        if entry is None:
            pre = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        else:
            t = entry.transforms()
            pre = Preprocess(
                resize=int(t.resize_size[0]) if t.resize_size else int(t.crop_size[0]),
                crop=int(t.crop_size[0]),
                mean=tuple(float(v) for v in t.mean),
                std=tuple(float(v) for v in t.std),
                interpolation=t.interpolation.value,
            )
    if image_size is not None:
        pre.resize = pre.crop = int(image_size)
    if grayscale:
        pre.grayscale = True
    return pre


def import_weights(path: str | os.PathLike) -> Path:
    """Verify a torchvision weights file and copy it into the torch hub cache."""
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"no such file: {path}")
    known = known_weight_files().get(path.name)
    if known is None:
        raise FeatxError(
            f"{path.name} is not the name of a torchvision weights file (expected e.g. "
            "mobilenet_v2-b0353104.pth); use it directly with --weights PATH instead."
        )
    check_file_hash(path)
    read_tensors(path)
    dest = hub_checkpoint_dir() / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dest)
    return dest


@contextlib.contextmanager
def _no_init():
    """Skip weight initialisation while probing shapes (it dominates building big models)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def skeleton(name: str) -> nn.Module:
    """The architecture of ``name`` without weights: for module names and blocks, at no cost."""
    check_backbone(name)
    try:
        with torch.device("meta"):
            return _build(name, None)
    except Exception:  # a few models (RegNet) cannot be built on the meta device
        with _no_init():
            return _build(name, None)


def describe(name: str) -> dict:
    """Default tap, its feature dimension and local weight availability, without real compute.

    The model is built on the meta device, so even the largest model costs no memory.
    """
    fam = family_of(name)
    info = {"name": name, "default_tap": fam.default_tap or "(input of last Linear)", "dim": None}
    enum = _weights_enum(name)
    info["weights_local"] = [e.name for e in enum or () if cached_file(e).exists()]
    size = 299 if name == "inception_v3" else 224
    from featx.extract import TapRecorder

    def probe(device: str, size: int) -> int:
        with torch.device(device), (_no_init() if device == "cpu" else contextlib.nullcontext()):
            model = _build(name, None).eval()
            tap = default_tap(name, model)
            with torch.no_grad(), TapRecorder(model, {tap: "avg"}, nhwc=fam.nhwc) as rec:
                out = rec.run(torch.zeros(1, 3, size, size))
        info["default_tap"] = tap
        return int(out[tap].shape[1])

    try:  # the meta device costs neither memory nor compute ...
        info["dim"] = probe("meta", size)
    except Exception:
        try:  # ... but a few models (RegNet) cannot be built there
            info["dim"] = probe("cpu", 64)  # pooled taps have the same width at any size
        except Exception:
            pass
    return info
