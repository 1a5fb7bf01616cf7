"""Hugging Face transformers vision models (``--backbone hf:ORG/NAME``, or ``hf:FOLDER`` for a
model saved with ``save_pretrained``), e.g. ``hf:facebook/dinov2-small``,
``hf:google/siglip-base-patch16-224`` (its vision tower).

The network is the model's vision tower (``vision_model`` where the model has a text tower
too); its default tap, ``embedding``, is the tower's pooled output (``pooler_output``), or its
CLS token where it has none.  Weights: the repository's from the Hugging Face hub cache
(downloaded when missing and online), ``none`` (seeded random initialisation of the
repository's config), or a path: what ``save_pretrained`` wrote, or a state dict file.
Preprocessing: the repository's ``preprocessor_config.json``.  Blocks: the encoder's layers.
transformers is imported here only.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from featx.adapters import (file_weights, EMBEDDING, Backbone, Source, add_embedding, add_head, on_meta, read_state, seeded,
                            weights_in)
from featx.errors import FeatxError, root_cause
from featx.heads import Head
from featx.preprocess import Preprocess
from featx.registry import Block, load_state
from featx.taps import Layout
from featx.weights import Weights, state_digest

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbers, as image processors record them


def _transformers():
    return SOURCE.require("transformers")


def _pooled(cls):
    def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = cls.forward(model, pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return pooled.flatten(1)
    return embed


class HFBackbone(Backbone):
    source = "hf"

    def __init__(self, name: str, model_name: str):
        super().__init__(name, model_name)
        self._config = None
        self._folder: Path | None = None

    # -- files ------------------------------------------------------------------------
    def folder(self) -> Path:
        """The repository's files (config, preprocessing, weights): a local folder, or the hub
        cache's snapshot of them (downloaded when missing)."""
        if self._folder is None:
            if os.path.isdir(self.model_name):
                self._folder = Path(self.model_name)
            else:
                self._folder = _snapshot(self.model_name)
        return self._folder

    def config(self):
        if self._config is None:
            t = _transformers()
            try:
                self._config = t.AutoConfig.from_pretrained(str(self.folder()))
            except FeatxError:
                raise
            except Exception as e:  # noqa: BLE001 - no config.json, an unknown model type...
                raise FeatxError(f"cannot read the config of {self.name} ({root_cause(e)}).") from None
        return self._config

    def _build(self, device: str | None = None) -> nn.Module:
        t = _transformers()
        with warnings.catch_warnings(), torch.device(device or torch.get_default_device()):
            warnings.simplefilter("ignore")
            model = t.AutoModel.from_config(self.config())
        return self._tower(model)

    @staticmethod
    def _tower(model: nn.Module) -> nn.Module:
        tower = getattr(model, "vision_model", None) or model
        return add_embedding(tower, _pooled(type(tower)))

    # -- weights ----------------------------------------------------------------------
    def resolve_weights(self, spec: str | None, seed: int = 0) -> Weights:
        spec = spec or "DEFAULT"
        if spec.lower() == "none":
            return Weights("none", seed=int(seed))
        if spec.upper() == "DEFAULT" or spec == self.model_name:
            return Weights(self.model_name)
        if os.path.exists(spec):
            return Weights(f"file:{os.path.basename(os.path.normpath(spec))}", path=spec)
        raise FeatxError(f"--weights {spec!r} is neither a file nor the weights of {self.name}; allowed: DEFAULT (the "
                         "repository's), none, a file or folder path.")

    def _file(self, w: Weights) -> Path:
        return weights_in(w.path if w.path is not None else self.folder(), WEIGHT_FILES)

    def identify(self, w: Weights) -> Weights:
        return w if w.sha256 or w.id == "none" else file_weights(w, self._file(w))

    def load(self, w: Weights) -> tuple[nn.Module, Weights]:
        if w.id == "none":
            with seeded(w.seed):
                tower = self._build()
            return tower.eval(), Weights("none", sha256=state_digest(tower.state_dict()), seed=w.seed)
        w = self.identify(w)
        path = self._file(w)
        folder = Path(w.path) if w.path is not None else self.folder()
        if w.meta is None and folder.is_dir():  # what save_pretrained wrote: transformers' loader (its key renames)
            t = _transformers()
            try:
                with warnings.catch_warnings(), _no_progress_bar(t):
                    warnings.simplefilter("ignore")
                    model = t.AutoModel.from_pretrained(str(folder))
            except Exception as e:  # noqa: BLE001 - a foreign or damaged folder
                raise FeatxError(f"cannot load {folder} as backbone {self.name} ({root_cause(e)}).") from None
            return self._tower(model).eval(), w
        tower = self._with_head(w.meta) if w.meta is not None else self._build()
        state = read_state(path)
        own = tower.state_dict()
        if not any(k in own for k in state):  # a whole model's file (text tower too, or a prefix): its tower's part
            state = _tower_part(state, own)
        load_state(tower, state, f"the tensors of {path} do not fit backbone {self.name}")
        return tower.eval(), w

    def _with_head(self, meta: dict, device: str | None = None) -> nn.Module:
        tower = self._build(device)
        self.replace_head(tower, meta["num_classes"], meta["head"], meta.get("hidden", 512))
        return tower

    def skeleton(self, w: Weights | None = None) -> nn.Module:
        meta = w.meta if w is not None else None
        return on_meta(lambda *on: self._with_head(meta, *on) if meta else self._build(*on))

    # -- what the network is --------------------------------------------------------------
    def preprocess(self, w: Weights) -> Preprocess:
        cfg = self.config()
        vision = getattr(cfg, "vision_config", None) or cfg
        size = int(getattr(vision, "image_size", 224) or 224)
        pre = Preprocess(resize=size, crop=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         interpolation="bicubic")
        f = self.folder() / "preprocessor_config.json"
        if not f.is_file():
            return pre
        p = json.loads(f.read_text())
        crop = p.get("crop_size") if p.get("do_center_crop", "crop_size" in p) else None
        resize = p.get("size") or {}
        crop_px = _side(crop) if crop else _side(resize) or size
        resize_px = resize.get("shortest_edge") if isinstance(resize, dict) else resize
        return Preprocess(resize=int(resize_px or crop_px), crop=int(crop_px),
                          mean=tuple(map(float, p.get("image_mean", pre.mean))),
                          std=tuple(map(float, p.get("image_std", pre.std))),
                          interpolation=RESAMPLE.get(p.get("resample"), "bicubic"))

    def default_tap(self, model: nn.Module) -> str:
        return EMBEDDING

    def blocks(self, model: nn.Module) -> list[Block]:
        """The encoder's layers: the longest ModuleList of the tower."""
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
        if not lists:
            return []
        name, layers = max(lists, key=lambda nm: len(nm[1]))
        return [Block(f"{name}.{i}", (f"{name}.{i}",)) for i in range(len(layers))]

    def layout(self, model: nn.Module | None = None) -> Layout:
        model = model if model is not None else self.bare()
        cls = any(n.endswith(("cls_token", "class_embedding")) for n, _ in model.named_parameters())
        cfg = self.config()
        registers = int(getattr(getattr(cfg, "vision_config", None) or cfg, "num_register_tokens", 0) or 0)
        return Layout(prefix_tokens=int(cls) + registers)

    def replace_head(self, model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                     dropout: float = 0.5) -> Head:
        cfg = self.config()
        width = int(getattr(getattr(cfg, "vision_config", None) or cfg, "hidden_size"))
        return add_head(model, width, num_classes, head, hidden, dropout)


@contextlib.contextmanager
def _no_progress_bar(t):
    """transformers' "Loading weights" bar off while featx loads (featx shows its own), and back
    as it was afterwards."""
    log = t.utils.logging
    was = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            log.enable_progress_bar()


def _side(size) -> int | None:
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge") or size.get("width")
    return int(size) if size else None


def _tower_part(state: dict, own: dict) -> dict:
    """The tensors of a vision tower in a whole model's state dict (``vision_model.*``)."""
    for prefix in ("vision_model.", "model.vision_model.", "model."):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part and any(k in own for k in part):
            return part
    return state


def _snapshot(repo_id: str) -> Path:
    """The files featx needs of a hub repository, from the hub cache (downloaded when missing)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FeatxError("hf: backbones need huggingface_hub; `pip install 'featx[hf]'` adds it.") from None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "preprocessor_config.json",
                                                                 "model.safetensors"]))
        if not (folder / "model.safetensors").is_file():  # an older repository: PyTorch's format
            folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "preprocessor_config.json",
                                                                     "pytorch_model.bin"]))
    except Exception as e:  # noqa: BLE001 - offline and not cached, no such repository...
        raise FeatxError(f"{repo_id} is not in the Hugging Face cache and could not be downloaded "
                         f"({root_cause(e)}); fill the cache where a network is (`huggingface-cli download "
                         f"{repo_id}`, then copy HF_HOME), or give a folder saved with save_pretrained.") from None
    return folder


class HFSource(Source):
    prefix = "hf"
    package = "transformers"
    extra = "hf"

    def backbone(self, model_name: str) -> Backbone:
        _transformers()
        return HFBackbone(f"hf:{model_name}", model_name)

    def models(self, pattern: str | None = None) -> list[str]:
        """The models in the local hub cache (the hub itself holds thousands: search it at
        huggingface.co/models)."""
        import fnmatch

        try:
            from huggingface_hub import scan_cache_dir

            repos = sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
        except Exception:  # noqa: BLE001 - no cache yet
            repos = []
        return [r for r in repos if fnmatch.fnmatch(r, pattern)] if pattern else repos


    def none_listed(self, pattern: str | None) -> str:
        matching = f" matching {pattern!r}" if pattern else ""
        return (f"the Hugging Face cache (HF_HOME) holds no model{matching}; featx lists only cached models, and any "
                "hf:ORG/NAME of a vision model works where a network is (e.g. hf:facebook/dinov2-small), as does "
                "hf:FOLDER for a model saved with save_pretrained.")


SOURCE = HFSource()
