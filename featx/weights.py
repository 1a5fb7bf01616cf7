"""Backbone weights: resolve ``--weights``, verify, load, import; fine-tuned network files.

Named weights go through torchvision's own API (``get_model_weights``, ``WeightsEnum.verify``,
download when online, the standard ``TORCH_HOME`` cache, hash check).  A file is read with
``torch.load(weights_only=True)``, so it can hold tensors and plain containers but never
run code.  Random weights (``none``) are seeded, and their parameters hashed, so that the
same network can be made, and checked, again.

A fine-tuned network (``featx finetune``'s ``backbone.pt``) is a state dict with featx's
metadata beside it; :func:`save_finetuned` writes it and :func:`finetuned_meta` reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model_weights

from featx import registry
from featx.errors import FeatxError
from featx.files import atomic_open, os_error, write_text
from featx.heads import replace_head
from featx.preprocess import Preprocess

# torch.hub's own rule: the sha256 prefix sits between the last '-' and the extension.
HASH_REGEX = re.compile(r"-([a-f0-9]{6,})\.")
FINETUNED = "finetune"  # the "featx" tag of a fine-tuned network file


@dataclass(frozen=True)
class Weights:
    """Which weights a backbone carries, and where they came from."""

    id: str  # "MobileNet_V2_Weights.IMAGENET1K_V1", "none", or "file:<name>"
    sha256: str = ""  # of the file read; random weights: of the parameters made; "" until loaded
    enum: object | None = None  # the torchvision weights entry, when one applies
    path: str | None = None  # the file, when one was given
    meta: dict | None = None  # featx fine-tuning metadata embedded in the file
    seed: int | None = None  # random weights: the seed of their initialisation
    num_classes: int | None = None  # outputs of the head the state holds (a file's), when known


def weights_enum(name: str):
    """torchvision's weights enum of a model, or None."""
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


def state_digest(state: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors, in order."""
    h = hashlib.sha256()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def known_weight_files() -> dict[str, tuple[str, object]]:
    """basename of every torchvision weights URL -> (model name, weights entry)."""
    out = {}
    for model in registry.available_backbones():
        for entry in weights_enum(model) or ():
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


def read_tensors(path: str | os.PathLike, mmap: bool = False):
    """``torch.load(weights_only=True)``: tensors and plain containers, never code from the file.

    ``mmap`` leaves the tensors on disk where the file's format allows it (files in torch's
    legacy format are read whole).
    """
    try:
        with open(path, "rb"):  # the file itself: missing, unreadable...
            pass
    except OSError as e:
        raise os_error(e, "read", path) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap can only be used" in str(e):
            return read_tensors(path)
        error = e
    except Exception as e:  # noqa: BLE001 - a format error, said in featx's words below
        error = e
    # torch's own message advises weights_only=False, i.e. running the file's code: featx
    # never does that, so it says what is wrong in its own words
    why = ("it holds Python objects besides tensors, and featx never unpickles those"
           if "GLOBAL" in str(error) else "it is not a PyTorch weights file (a state dict saved with torch.save)")
    raise FeatxError(f"cannot read weights file {path}: {why}.") from None


def resolve_weights(name: str, spec: str | None, seed: int = 0) -> Weights:
    """Interpret ``--weights``: DEFAULT, a weights name of ``name``, ``none``, or a file path.

    ``seed`` seeds the initialisation of random weights (``none``), so that the same
    command makes the same network every time.
    """
    spec = spec or "DEFAULT"
    if spec.lower() == "none":
        return Weights("none", seed=int(seed))
    if os.path.exists(spec):
        return Weights(f"file:{os.path.basename(spec)}", path=spec)
    enum = weights_enum(name)
    if enum is not None:
        try:  # torchvision's own parser: "IMAGENET1K_V1", "DEFAULT" or "Enum.MEMBER"
            entry = enum.verify(spec)
            return Weights(f"{enum.__name__}.{entry.name}", enum=entry)
        except (KeyError, ValueError, TypeError):
            pass
    allowed = ["DEFAULT", "none", "a file path"] + list(enum.__members__ if enum else [])
    raise FeatxError(f"--weights {spec!r} is neither a file nor a weights name of {name}; allowed: {', '.join(allowed)}.")


def identify(name: str, weights: Weights) -> Weights:
    """Complete the record without building the network: the sha256 of the weights file (a
    torchvision entry is fetched into the hub cache first), the torchvision entry a file
    turns out to be, a fine-tuned file's metadata and the width of the head the state holds.

    Random weights are identified by the digest of the parameters they make, so only
    :func:`load_backbone` completes them.
    """
    registry.check_backbone(name)
    if weights.sha256 or weights.id == "none":
        return weights
    if weights.enum is not None:
        path = _fetch(weights)
        return dataclasses.replace(weights, sha256=sha256_of(path), num_classes=len(weights.enum.meta["categories"]))
    sha = check_file_hash(weights.path)
    obj = read_tensors(weights.path, mmap=True)
    meta = None
    if isinstance(obj, dict) and "featx" in obj and "state_dict" in obj:
        meta, obj = obj["featx"], obj["state_dict"]
    if not isinstance(obj, dict):
        raise FeatxError(f"weights file {weights.path} holds a {type(obj).__name__}, not a state dict.")
    out = dataclasses.replace(weights, sha256=sha, meta=meta, num_classes=_head_width(obj))
    known = known_weight_files().get(os.path.basename(weights.path))
    if known is not None and known[0] == name:  # torchvision's own file, given by path
        out = dataclasses.replace(out, enum=known[1], id=f"{type(known[1]).__name__}.{known[1].name}")
    return out


def _head_width(state: dict) -> int | None:
    """Outputs of the last Linear of a state dict (its head), or None."""
    for key in reversed(list(state)):
        if key.endswith("weight") and getattr(state[key], "ndim", 0) == 2:
            return int(state[key].shape[0])
    return None


def _fetch(weights: Weights) -> Path:
    """A torchvision entry's file in the hub cache, downloaded (hash-checked) when missing."""
    path = cached_file(weights.enum)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        m = HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(weights.enum.url, str(path), hash_prefix=m.group(1) if m else None,
                                       progress=False)
    except (urllib.error.URLError, OSError) as e:
        raise FeatxError(
            f"weights {weights.id} are not in the torch hub cache ({hub_checkpoint_dir()}) and could "
            f"not be downloaded ({e}); copy the file {path.name} there with `featx weights import FILE`, "
            "or use --weights PATH or --weights none."
        ) from None
    except RuntimeError as e:  # torch.hub's hash mismatch
        raise FeatxError(f"weights {weights.id} failed their hash check: {e}") from None
    return path


def skeleton_for(name: str, weights: Weights) -> nn.Module:
    """The architecture the weights load into (the head included) without the weights
    (:func:`featx.registry.skeleton`): for module names, tap widths and map sizes."""
    head = (weights.meta or {}).get("head")
    if head == "mlp":  # a fine-tuned MLP head: the backbone's own head replaced
        model = registry.skeleton(name, None, weights.enum)
        with torch.device(next(model.parameters()).device):
            replace_head(model, weights.meta["num_classes"], "mlp", weights.meta.get("hidden", 512))
        return model.eval()
    return registry.skeleton(name, weights.num_classes, weights.enum).eval()


def load_backbone(name: str, weights: Weights) -> tuple[nn.Module, Weights]:
    """Build the model with its weights, in eval mode on the CPU.

    Returns the model and the weights' record completed by loading (:func:`identify`; for
    random weights the digest of the parameters made).
    """
    registry.check_backbone(name)
    if weights.id == "none":
        # seeded, so that a rerun (or a resumed run) makes the same network; the digest of
        # the parameters lets a later run check that it made it again
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights.seed or 0)
            model = registry.build(name)
        return model.eval(), dataclasses.replace(weights, sha256=state_digest(model.state_dict()))
    weights = identify(name, weights)
    if weights.path is None:  # a torchvision entry, in the hub cache now
        state = torch.load(_fetch(weights), map_location="cpu", weights_only=True)
        return registry.build(name, weights.num_classes, state, weights.enum).eval(), weights
    obj = read_tensors(weights.path)
    state = obj["state_dict"] if weights.meta is not None else obj
    origin = f"the tensors of {weights.path}"
    if (weights.meta or {}).get("head") == "mlp":  # a fine-tuned MLP head has extra layers
        model = registry.build(name)
        replace_head(model, weights.meta["num_classes"], "mlp", weights.meta.get("hidden", 512))
        registry.load_state(model, state, f"{origin} do not fit backbone {name}")
        return model.eval(), weights
    return registry.build(name, weights.num_classes, state, weights.enum, origin=origin).eval(), weights


def preprocess_for(name: str, weights: Weights) -> Preprocess:
    """A torchvision network's preprocessing, from its weights' own ``transforms()``; random
    weights and files of unknown origin use the model's default ImageNet weights' (a
    fine-tuned network's own and featx's overrides: :func:`featx.adapters.preprocessing`)."""
    enum = weights_enum(name)
    entry = weights.enum or (enum.DEFAULT if enum else None)
    if entry is None:
        return Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    t = entry.transforms()
    return Preprocess(
        resize=int(t.resize_size[0]) if t.resize_size else int(t.crop_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=t.interpolation.value,
    )


def gflop_per_image(name: str, crop: int) -> float | None:
    """A torchvision network's forward GFLOP per image at ``crop`` px, from its weights'
    metadata (given at 224 px; scaled by area), or None when torchvision does not say."""
    enum = weights_enum(name)
    ops = list(enum)[0].meta.get("_ops") if enum else None
    return None if ops is None else float(ops) * (crop / 224) ** 2


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
    try:
        with open(path, "rb") as src, atomic_open(dest, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    except OSError as e:
        raise os_error(e, "read", path) from None
    return dest


# ----------------------------------------------------------------------------- fine-tuned networks


def save_tensors(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file renamed into place: a full disk or a kill
    leaves the previous file whole, and the error is the disk's, in one sentence."""

    class Recorder:  # torch turns an error of the file into its own RuntimeError: keep the cause
        def __init__(self, f):
            self.f, self.error = f, None

        def write(self, b):
            try:
                return self.f.write(b)
            except OSError as e:
                self.error = e
                raise

        def flush(self):
            self.f.flush()

    with atomic_open(path, "wb") as f:
        out = Recorder(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    return Path(path)


def save_finetuned(directory: Path, state: dict, meta: dict) -> Path:
    """Write ``backbone.pt`` (tensors + featx metadata, loadable with weights_only) and
    ``backbone.json`` (the metadata, for people); each replaced atomically."""
    meta = {"featx": FINETUNED, **meta}
    path = directory / "backbone.pt"
    save_tensors({"state_dict": {k: v.detach().cpu() for k, v in state.items()}, "featx": meta}, path)
    write_text(directory / "backbone.json", json.dumps(meta, indent=1))
    return path


def finetuned_meta(path: str | os.PathLike) -> dict:
    """The featx metadata of a fine-tuned network file (its tensors stay on disk)."""
    if not Path(path).is_file():
        raise FeatxError(f"weights file {path} does not exist.")
    obj = read_tensors(path, mmap=True)
    meta = obj.get("featx") if isinstance(obj, dict) else None
    if not meta or meta.get("featx") != FINETUNED:
        raise FeatxError(f"{path} is not a featx fine-tuned network; give a model bundle (.skops) instead.")
    if "logits_module" not in meta:  # files written before the logits module was recorded
        meta["logits_module"] = meta["head_module"] + (".3" if meta["head"] == "mlp" else "")
    return meta
