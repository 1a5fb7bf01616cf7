"""open_clip's image towers (``--backbone open_clip:MODEL/PRETRAINED``, e.g.
``open_clip:ViT-B-32/laion2b_s34b_b79k``).

The network is the CLIP model's image tower (``model.visual``); its default tap,
``embedding``, is ``encode_image`` (not normalised).  Weights: the PRETRAINED tag's file from
open_clip's cache (the Hugging Face hub, or its download URL), ``none`` (seeded random
initialisation), or a path to a checkpoint of the whole CLIP model (what
``torch.save(model.state_dict())`` wrote).  Preprocessing: the tower's ``preprocess_cfg``.
Blocks: the transformer's residual blocks (ViTs) or the ResNet's stages.  open_clip is
imported here only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
from torch import nn

from featx.adapters import (file_weights, EMBEDDING, Backbone, Source, add_embedding, add_head, close_to, on_meta, read_state,
                            seeded)
from featx.errors import FeatxError, root_cause
from featx.heads import Head
from featx.preprocess import Preprocess
from featx.registry import Block, load_state
from featx.taps import Layout
from featx.weights import Weights, state_digest


def _open_clip():
    return SOURCE.require("open_clip")


def _tower_forward(cls):
    def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = cls.forward(model, x)
        return out[0] if isinstance(out, tuple) else out  # (pooled, tokens) when output_tokens is set
    return embed


@contextlib.contextmanager
def _no_random_init_notice():
    """Keep open_clip's "No pretrained weights loaded ... initialized randomly" notice (logged on
    the root logger) out of featx's output while featx builds a tower it loads itself, or that
    ``--weights none`` asked for; the root logger is left as it was (a handler in place keeps
    ``logging.warning`` from configuring it)."""
    root = logging.getLogger()
    handler = logging.NullHandler()

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root.addHandler(handler)
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        root.removeHandler(handler)


class OpenClipBackbone(Backbone):
    source = "open_clip"

    def __init__(self, name: str, model_name: str):
        super().__init__(name, model_name)
        self.arch, _, self.tag = model_name.partition("/")

    def _clip(self, device: str = "cpu", checkpoint: str | None = None) -> nn.Module:
        with warnings.catch_warnings(), torch.device(device), _no_random_init_notice():
            warnings.simplefilter("ignore")
            return _open_clip().create_model(self.arch, pretrained=checkpoint, device=device)

    def _tower(self, clip: nn.Module) -> nn.Module:
        tower = clip.visual
        return add_embedding(tower, _tower_forward(type(tower)))

    # -- weights ----------------------------------------------------------------------
    def resolve_weights(self, spec: str | None, seed: int = 0) -> Weights:
        spec = spec or "DEFAULT"
        if spec.lower() == "none":
            return Weights("none", seed=int(seed))
        if os.path.exists(spec):
            return Weights(f"file:{os.path.basename(os.path.normpath(spec))}", path=spec)
        if spec.upper() == "DEFAULT" or spec == self.tag:
            if not self.tag:
                tags = _open_clip().list_pretrained_tags_by_model(self.arch)
                raise FeatxError(f"open_clip:{self.arch} names no pretrained weights; name them as "
                                 f"open_clip:{self.arch}/TAG (tags: {', '.join(tags) or 'none'}), or use "
                                 "--weights PATH or --weights none.")
            return Weights(self.tag)
        raise FeatxError(f"--weights {spec!r} is neither a file nor the weights of {self.name}; allowed: DEFAULT (the "
                         "tag in the name), none, a file path.")

    def _file(self, w: Weights) -> str:
        if w.path is not None:
            return str(w.path)
        oc = _open_clip()
        cfg = oc.get_pretrained_cfg(self.arch, self.tag)
        try:
            path = oc.pretrained.download_pretrained(cfg)
        except Exception as e:  # noqa: BLE001 - offline and not cached, a network error...
            path, error = None, e
        if not path:
            why = root_cause(error) if "error" in locals() else "no file for this tag"
            raise FeatxError(f"the weights of {self.name} are not in open_clip's cache and could not be downloaded "
                             f"({why}); fill the Hugging Face cache (HF_HOME) where a network is, or use --weights "
                             "PATH or --weights none.") from None
        return str(path)

    def identify(self, w: Weights) -> Weights:
        return w if w.sha256 or w.id == "none" else file_weights(w, self._file(w))

    def load(self, w: Weights) -> tuple[nn.Module, Weights]:
        if w.id == "none":
            with seeded(w.seed):
                tower = self._tower(self._clip())
            return tower.eval(), Weights("none", sha256=state_digest(tower.state_dict()), seed=w.seed)
        w = self.identify(w)
        path = self._file(w)
        if w.meta is not None:  # a tower featx fine-tuned, with its head
            tower = self._with_head(w.meta)
            load_state(tower, read_state(path), f"the tensors of {path} do not fit backbone {self.name}")
            return tower.eval(), w
        try:
            clip = self._clip(checkpoint=path)
        except FeatxError:
            raise
        except Exception as e:  # noqa: BLE001 - open_clip's loader: a foreign or damaged checkpoint
            raise FeatxError(f"the tensors of {path} do not fit backbone {self.name} ({root_cause(e)}).") from None
        return self._tower(clip).eval(), w

    def _with_head(self, meta: dict, device: str = "cpu") -> nn.Module:
        tower = self._tower(self._clip(device))
        self.replace_head(tower, meta["num_classes"], meta["head"], meta.get("hidden", 512))
        return tower

    def skeleton(self, w: Weights | None = None) -> nn.Module:
        meta = w.meta if w is not None else None
        return on_meta(lambda *on: self._with_head(meta, *on) if meta else self._tower(self._clip(*on)))

    # -- what the network is --------------------------------------------------------------
    def preprocess(self, w: Weights) -> Preprocess:
        cfg = getattr(self.bare(), "preprocess_cfg", None) or {}
        size = cfg.get("size", 224)
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # open_clip resizes the shorter side to the input size and crops the centre ("shortest")
        return Preprocess(resize=size, crop=size, mean=tuple(map(float, cfg.get("mean", (0.48145466, 0.4578275,
                                                                                       0.40821073)))),
                          std=tuple(map(float, cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))),
                          interpolation=str(cfg.get("interpolation", "bicubic")))

    def default_tap(self, model: nn.Module) -> str:
        return EMBEDDING

    def blocks(self, model: nn.Module) -> list[Block]:
        names = dict(model.named_modules())
        if "transformer.resblocks" in names:  # a ViT tower
            return [Block(f"transformer.resblocks.{n}", (f"transformer.resblocks.{n}",))
                    for n, _ in names["transformer.resblocks"].named_children()]
        if "trunk" in names:  # a timm trunk (ConvNeXt and others)
            info = getattr(names["trunk"], "feature_info", None) or []
            mods = [i["module"] for i in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
            return [Block(f"trunk.{m}", (f"trunk.{m}",)) for m in mods]
        return [Block(n, (n,)) for n in ("layer1", "layer2", "layer3", "layer4") if n in names]  # ModifiedResNet

    def layout(self, model: nn.Module | None = None) -> Layout:
        return Layout(prefix_tokens=1)

    def replace_head(self, model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                     dropout: float = 0.5) -> Head:
        return add_head(model, int(model.output_dim), num_classes, head, hidden, dropout)


class OpenClipSource(Source):
    prefix = "open_clip"
    package = "open_clip_torch"
    extra = "clip"

    def backbone(self, model_name: str) -> Backbone:
        oc = _open_clip()
        arch, _, tag = model_name.partition("/")
        if arch not in oc.list_models():
            raise FeatxError(f"unknown open_clip model {arch!r}{close_to(arch, oc.list_models())}; "
                             "`featx backbones --source open_clip` lists "
                             "them.")
        if tag and tag not in oc.list_pretrained_tags_by_model(arch):
            raise FeatxError(f"open_clip has no weights {tag!r} for {arch}; its tags: "
                             f"{', '.join(oc.list_pretrained_tags_by_model(arch)) or 'none'}.")
        return OpenClipBackbone(f"open_clip:{model_name}", model_name)

    def models(self, pattern: str | None = None) -> list[str]:
        import fnmatch

        names = [f"{m}/{t}" for m, t in _open_clip().list_pretrained()]
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


SOURCE = OpenClipSource()
