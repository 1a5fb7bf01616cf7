"""Backbone adapters: one protocol in front of every source of networks.

``--backbone`` names a network as ``SOURCE:NAME`` (``timm:resnet50.a1_in1k``,
``open_clip:ViT-B-32/laion2b_s34b_b79k``, ``hf:facebook/dinov2-small``) or, bare, a
torchvision model (``resnet50``).  :func:`backbone` answers with a :class:`Backbone`, which
knows for that network:

* how to resolve and verify ``--weights`` and build the network, with or without them;
* its architecture without weights (a skeleton, for module names and shapes);
* its preprocessing, default tap, tap aliases, blocks and token layout;
* how to put a new head on it for fine-tuning;

and its source lists its models.  The engine (extractor, graph, cache, finetune, sweep,
predict, the command line) asks only this protocol and never branches on the source.  Each
source is one module here, registered in :data:`SOURCES`; it imports its optional library
(timm, open_clip, transformers) only inside itself, so featx runs without any of them.
"""

from __future__ import annotations

import difflib
import contextlib
import importlib
import os
from pathlib import Path

import torch
from torch import nn

from featx.errors import FeatxError, root_cause
from featx.heads import Head
from featx.preprocess import Preprocess
from featx.registry import Block
from featx.taps import Layout
from featx.weights import Weights

# source prefix -> the module holding its adapter (its ``SOURCE`` attribute)
SOURCES = {
    "torchvision": "featx.adapters.torchvision",
    "timm": "featx.adapters.timm",
    "open_clip": "featx.adapters.open_clip",
    "hf": "featx.adapters.hf",
}
DEFAULT_SOURCE = "torchvision"  # a bare name


class Backbone:
    """One network of one source: what the engine asks of it (each source subclasses this).

    Attributes:
        name: the full ``--backbone`` value (``timm:resnet18``; bare for torchvision).
        model_name: the name within its source (``resnet18``).
    """

    source = ""

    def __init__(self, name: str, model_name: str):
        self.name, self.model_name = name, model_name
        self._bare: nn.Module | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- weights and building -------------------------------------------------------
    def resolve_weights(self, spec: str | None, seed: int = 0) -> Weights:
        """Interpret ``--weights``: DEFAULT, a name the source knows, ``none`` (seeded random
        initialisation) or a path."""
        raise NotImplementedError

    def identify(self, weights: Weights) -> Weights:
        """Complete the record without building the network (the sha256 of the weights)."""
        raise NotImplementedError

    def load(self, weights: Weights) -> tuple[nn.Module, Weights]:
        """The network with its weights, in eval mode on the CPU, and the completed record
        (random weights: the digest of the parameters made)."""
        raise NotImplementedError

    def skeleton(self, weights: Weights | None = None) -> nn.Module:
        """The architecture the weights load into, without weights (meta device where it can)."""
        raise NotImplementedError

    def bare(self) -> nn.Module:
        """The skeleton without weights, made once for this Backbone and shared: for reading
        its architecture (configs, names, widths), never for changing."""
        if self._bare is None:
            self._bare = self.skeleton()
        return self._bare

    # -- what the network is ---------------------------------------------------------
    def preprocess(self, weights: Weights) -> Preprocess:
        """The network's own preprocessing (size, crop, interpolation, mean and std)."""
        raise NotImplementedError

    def default_tap(self, model: nn.Module) -> str:
        raise NotImplementedError

    def gflop(self, crop: int) -> float | None:
        """The forward pass's GFLOP per image at ``crop`` px where the source states it (it
        decides whether compiling freezes the graph), else None."""
        return None

    def aliases(self) -> dict[str, str]:
        """Friendly tap names -> module names (``fc7``)."""
        return {}

    def resolve_tap(self, model: nn.Module, tap: str) -> str:
        """Map an alias to a module name and check that the module exists."""
        from featx.registry import INPUT_SUFFIX

        tap = self.aliases().get(tap, tap)
        module = tap[: -len(INPUT_SUFFIX)] if tap.endswith(INPUT_SUFFIX) else tap
        if module == "" or module not in dict(model.named_modules()):
            raise FeatxError(f"backbone {self.name} has no layer {tap!r}; `featx backbones {self.name}` lists its "
                             "layers.")
        return tap

    def blocks(self, model: nn.Module) -> list[Block]:
        """Ordered blocks, input side first: the taps of a sweep and the unit of freezing."""
        raise NotImplementedError

    def layout(self, model: nn.Module | None = None) -> Layout:
        return Layout()

    def known_weights(self) -> dict[str, str]:
        """Named weights of this network -> the file name each is cached under."""
        return {}

    # -- fine-tuning --------------------------------------------------------------------
    def replace_head(self, model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                     dropout: float = 0.5) -> Head:
        """Put a new ``linear`` or ``mlp`` head for ``num_classes`` classes on the network."""
        raise NotImplementedError


class Source:
    """A source of networks: makes its :class:`Backbone` for a name and lists its models."""

    prefix = ""
    package = ""  # the optional library, as pip installs it
    extra = ""  # featx's extra that installs it

    def backbone(self, model_name: str) -> Backbone:
        raise NotImplementedError

    def models(self, pattern: str | None = None) -> list[str]:
        """Names this source can build (``pattern``: a shell-style filter)."""
        raise NotImplementedError

    def none_listed(self, pattern: str | None) -> str:
        """The sentence for an empty listing."""
        return f"no {self.prefix} model matches {pattern!r}." if pattern else f"{self.package} lists no models."

    def require(self, module: str):
        """Import the source's library, or say in one sentence which ``pip install`` adds it."""
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise FeatxError(f"--backbone {self.prefix}:... needs {self.package}, which is not installed "
                             f"({e}); `pip install 'featx[{self.extra}]'` adds it.") from None


def split(name: str) -> tuple[str, str]:
    """``timm:resnet18`` -> (``timm``, ``resnet18``); a bare name is torchvision's."""
    prefix, sep, rest = str(name).partition(":")
    if not sep:
        return DEFAULT_SOURCE, str(name)
    if prefix not in SOURCES:
        raise FeatxError(f"--backbone {name!r}: unknown source {prefix!r}; use one of "
                         f"{', '.join(p + ':NAME' for p in SOURCES if p != DEFAULT_SOURCE)}, or a torchvision name.")
    if not rest:
        raise FeatxError(f"--backbone {name!r} names no model; e.g. {prefix}:NAME (`featx backbones --source "
                         f"{prefix}` lists them).")
    return prefix, rest


def source(prefix: str) -> Source:
    """The registered source of that prefix."""
    if prefix not in SOURCES:
        raise FeatxError(f"unknown source {prefix!r}; one of {', '.join(SOURCES)}.")
    return importlib.import_module(SOURCES[prefix]).SOURCE


def backbone(name: str) -> Backbone:
    """The :class:`Backbone` named by a ``--backbone`` value (its model checked to exist)."""
    prefix, model_name = split(name)
    return source(prefix).backbone(model_name)


def preprocessing(bk: Backbone, weights: Weights, image_size: int | None = None,
                  grayscale: bool = False) -> Preprocess:
    """The preprocessing a job uses: a fine-tuned network's own (recorded in its file), else
    the backbone's, with featx's overrides (``--image-size``, ``--grayscale``)."""
    if weights.meta and "preprocessing" in weights.meta:
        pre = Preprocess.from_json(weights.meta["preprocessing"])
    else:
        pre = bk.preprocess(weights)
    if image_size is not None:
        pre.resize = pre.crop = int(image_size)
    if grayscale:
        pre.grayscale = True
    return pre


def describe(bk: Backbone) -> dict:
    """Default tap and its feature dimension, from the skeleton (no weights, no memory);
    ``error`` says why a dimension could not be measured."""
    from featx.errors import root_cause
    from featx.taps import widths

    model = bk.bare()
    tap = bk.default_tap(model)
    info = {"name": bk.name, "default_tap": tap, "dim": None}
    on_meta = next(model.parameters()).device.type == "meta"
    size = bk.preprocess(Weights("none")).crop if on_meta else 64  # pooled widths do not depend on it
    try:
        info["dim"] = widths(model, {tap: (tap, "avg")}, size, bk.layout(model))[tap]
    except Exception as e:  # noqa: BLE001 - the listing goes on; the reason is kept
        info["error"] = root_cause(e)
    return info


def summary(bk: Backbone) -> dict:
    """What ``featx backbones NAME`` shows: default tap and width, blocks, aliases, the first
    module names and the named weights, from the skeleton."""
    model = bk.bare()
    info = describe(bk)
    out = {"default_tap": info["default_tap"], "dim": info["dim"], "blocks": [b.tap for b in bk.blocks(model)],
           "aliases": bk.aliases(), "modules": [n for n, _ in list(model.named_modules())[1:6]],
           "weights": bk.known_weights()}
    return {**out, "error": info["error"]} if "error" in info else out


# ----------------------------------------------------------------------------- shared by sources

EMBEDDING = "embedding"  # the module added to a network whose output is the network's own embedding
HEAD = "embedding_head"  # the module fine-tuning puts after it


def _embedded_forward(self, x):
    z = getattr(self, EMBEDDING)(type(self).featx_embed(self, x))
    head = getattr(self, HEAD, None)
    return z if head is None else head(z)


def on_meta(make) -> nn.Module:
    """A skeleton in eval mode: ``make("meta")`` builds it on the meta device (no memory, no
    initialisation); a model whose construction reads tensor values fails there, and then
    ``make()`` builds it where its library builds by default (the CPU)."""
    try:
        return make("meta").eval()
    except (NotImplementedError, RuntimeError):
        return make().eval()


def close_to(name: str, candidates) -> str:
    """" (close: a, b)" for the names near a mistyped one, else ""."""
    close = difflib.get_close_matches(name, list(candidates), n=6, cutoff=0.5)
    return f" (close: {', '.join(close)})" if close else ""


def add_embedding(model: nn.Module, embed) -> nn.Module:
    """Make ``model(x)`` return ``embed(model, x)``, the network's own embedding (timm's
    pre-logits features, open_clip's ``encode_image``, a transformers model's pooled output),
    as the output of a module named ``embedding``: a tap like any other, so the engine
    records it with the same hooks and graph cut.  Module and parameter names stay the
    library's own; a head installed by :func:`add_head` turns the output into class scores."""
    for name in (EMBEDDING, HEAD):
        if hasattr(model, name):
            raise FeatxError(f"{type(model).__name__} already has an attribute {name!r}; featx cannot add its own.")
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"forward": _embedded_forward, "featx_embed": staticmethod(embed)})
    model.add_module(EMBEDDING, nn.Identity())
    return model


def embedding_width(model: nn.Module, size: int) -> int:
    """The width of the ``embedding`` output for ``size`` x ``size`` images (on the model's
    device: nothing computed on the meta device)."""
    from featx.taps import widths

    return widths(model, {EMBEDDING: (EMBEDDING, "avg")}, size)[EMBEDDING]


def add_head(model: nn.Module, in_features: int, num_classes: int, head: str = "linear", hidden: int = 512,
             dropout: float = 0.5) -> Head:
    """A new ``linear`` or ``mlp`` head on the ``embedding`` of a network made by
    :func:`add_embedding` (its parameters are made where the model's are)."""
    from featx.heads import HEADS, mlp

    if head not in HEADS:
        raise FeatxError(f"--head {head!r} is not one of {', '.join(HEADS)}.")
    device = next(model.parameters()).device
    with torch.device(device):
        new = nn.Linear(in_features, num_classes) if head == "linear" else mlp(in_features, num_classes, hidden,
                                                                                   dropout)
    model.add_module(HEAD, new)
    return Head(HEAD, HEAD if head == "linear" else f"{HEAD}.{len(new) - 1}")


def hub_file(repo_id: str, filenames: tuple[str, ...], what: str) -> str:
    """A file of a Hugging Face hub repository from the hub cache (``HF_HOME``), downloaded
    when missing and online: the first of ``filenames`` the repository has."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise FeatxError(f"{what} come from the Hugging Face hub, and huggingface_hub is not installed; "
                         "`pip install huggingface_hub` adds it.") from None
    error = None
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name)
        except EntryNotFoundError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - offline and not cached, no such repository, a network error...
            error = e
            break
    raise FeatxError(f"{what} ({repo_id}: {' or '.join(filenames)}) are not in the Hugging Face cache and could "
                     f"not be downloaded ({root_cause(error)}); fill the cache where a network is (e.g. "
                     "`huggingface-cli download " + repo_id + "`, then copy HF_HOME), or use --weights PATH or "
                     "--weights none.") from None


def read_state(path: str | os.PathLike) -> dict:
    """A state dict from a ``.safetensors`` file or a PyTorch file (tensors only, never code);
    a featx fine-tuned file's ``state_dict``."""
    from featx.weights import read_tensors

    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except ImportError:
            raise FeatxError(f"{path} is a safetensors file and safetensors is not installed; "
                             "`pip install safetensors` adds it.") from None
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file
            raise FeatxError(f"cannot read weights file {path}: {root_cause(e)}.") from None
    obj = read_tensors(path)
    if isinstance(obj, dict) and "featx" in obj and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FeatxError(f"weights file {path} holds a {type(obj).__name__}, not a state dict.")
    return obj


def file_weights(w: Weights, path: str | os.PathLike) -> Weights:
    """The record of weights read from ``path``: its sha256 (checked against a hash prefix in
    its name) and, for a network featx fine-tuned, its metadata (the tensors stay on disk)."""
    from featx.weights import check_file_hash, read_tensors

    meta = None
    if not str(path).endswith(".safetensors"):
        obj = read_tensors(path, mmap=True)
        meta = obj.get("featx") if isinstance(obj, dict) and "state_dict" in obj else None
    return Weights(w.id, sha256=check_file_hash(path), path=w.path, meta=meta, seed=w.seed)


def weights_in(path: str | os.PathLike, names: tuple[str, ...]) -> Path:
    """The weights file a path names: the file itself, or in a folder (what ``save_pretrained``
    wrote) the first of ``names`` it holds."""
    path = Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FeatxError(f"folder {path} holds no weights file ({', '.join(names)}).")
    return path


@contextlib.contextmanager
def seeded(seed: int | None):
    """Random initialisation made the same every time (``--weights none --seed N``), without
    touching the global generator's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed or 0))
        yield
