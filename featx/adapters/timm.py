"""timm's models (``--backbone timm:NAME``, a weights tag in the name: ``timm:resnet50.a1_in1k``).

Weights: timm's pretrained weights of that name from the Hugging Face hub cache (downloaded
when missing and online), ``none`` (seeded random initialisation), or a path: a weights file
(``.safetensors``, ``.pth``, ``.bin``) or the folder ``timm.models.save_for_hf`` (push_to_hub's
``save_pretrained``) wrote.  Preprocessing: timm's data config.  Default tap: ``embedding``,
timm's pre-logits features (``forward_head(forward_features(x), pre_logits=True)``).  Blocks:
timm's ``feature_info``.  timm is imported here only.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from featx.adapters import (file_weights, EMBEDDING, Backbone, Source, add_embedding, add_head, close_to, embedding_width,
                            hub_file, on_meta, read_state, seeded, weights_in)
from featx.errors import FeatxError
from featx.heads import Head
from featx.preprocess import Preprocess
from featx.registry import Block, load_state
from featx.taps import Layout
from featx.weights import Weights, state_digest

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm():
    return SOURCE.require("timm")


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


class TimmBackbone(Backbone):
    source = "timm"

    def _cfg(self):
        from timm.models import get_pretrained_cfg

        return get_pretrained_cfg(self.model_name)

    def _create(self, device: str | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
        """timm's model; a transformer with ``dynamic_img_size`` where it has one, so that
        ``--image-size`` can differ from the size it was trained at (its position embedding
        is resampled; at its own size nothing changes)."""
        with warnings.catch_warnings(), torch.device(device or torch.get_default_device()):
            warnings.simplefilter("ignore")
            try:
                return _timm().create_model(self.model_name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
            except TypeError:  # a model without the option (CNNs)
                return _timm().create_model(self.model_name, pretrained=pretrained, **kwargs)

    # -- weights ----------------------------------------------------------------------
    def resolve_weights(self, spec: str | None, seed: int = 0) -> Weights:
        spec = spec or "DEFAULT"
        if spec.lower() == "none":
            return Weights("none", seed=int(seed))
        if os.path.exists(spec):
            return Weights(f"file:{os.path.basename(os.path.normpath(spec))}", path=spec)
        cfg = self._cfg()
        hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if spec.upper() == "DEFAULT" or spec == hub:
            if not hub:
                raise FeatxError(f"timm has no pretrained weights on the Hugging Face hub for {self.model_name}; "
                                 "use --weights PATH or --weights none.")
            return Weights(hub)
        raise FeatxError(f"--weights {spec!r} is neither a file nor a weights name of {self.name}; allowed: DEFAULT, "
                         "none, a file or folder path (timm names its weights by a tag in the model name: "
                         "timm:resnet50.a1_in1k).")

    def _file(self, w: Weights) -> str:
        if w.path is not None:
            return str(weights_in(w.path, WEIGHT_FILES + ("open_clip_model.safetensors",)))
        return hub_file(w.id, WEIGHT_FILES, f"the weights of {self.name}")

    def identify(self, w: Weights) -> Weights:
        return w if w.sha256 or w.id == "none" else file_weights(w, self._file(w))

    def load(self, w: Weights) -> tuple[nn.Module, Weights]:
        if w.id == "none":
            with seeded(w.seed):
                model = self._create()
            add_embedding(model, _pre_logits)
            return model.eval(), Weights("none", sha256=state_digest(model.state_dict()), seed=w.seed)
        w = self.identify(w)
        path = self._file(w)
        if w.meta is not None:  # a network featx fine-tuned: the embedding and its head
            model = self._with_head(w.meta)
            load_state(model, read_state(path), f"the tensors of {path} do not fit backbone {self.name}")
            return model.eval(), w
        if w.path is None:  # timm's own weights, in the hub cache now: timm's loader (its key filters)
            model = self._create(pretrained=True, pretrained_cfg_overlay={"file": path})
        else:
            state = read_state(path)
            model = self._create(num_classes=self._classes_in(state))
            load_state(model, state, f"the tensors of {path} do not fit backbone {self.name}")
        add_embedding(model, _pre_logits)
        return model.eval(), w

    def _classes_in(self, state: dict) -> int:
        """The width of the classifier a state holds (0: none, as in DINOv2's weights)."""
        cfg = self._cfg()
        classifier = (getattr(cfg, "classifier", None) if cfg is not None else None) or "head"
        if isinstance(classifier, (list, tuple)):
            classifier = classifier[0]
        weight = state.get(f"{classifier}.weight")
        return int(weight.shape[0]) if weight is not None else 0

    def _with_head(self, meta: dict, device: str | None = None) -> nn.Module:
        model = add_embedding(self._create(device), _pre_logits)
        width = model.num_features if meta.get("embedding_dim") is None else meta["embedding_dim"]
        self.replace_head(model, meta["num_classes"], meta["head"], meta.get("hidden", 512), in_features=width)
        return model

    def skeleton(self, w: Weights | None = None) -> nn.Module:
        meta = (w.meta if w is not None else None) or None
        return on_meta(lambda *on: self._with_head(meta, *on) if meta else add_embedding(self._create(*on), _pre_logits))

    # -- what the network is --------------------------------------------------------------
    def preprocess(self, w: Weights) -> Preprocess:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=self.bare())
        size = int(cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct") or 1.0)
        return Preprocess(resize=math.floor(size / crop_pct), crop=size, mean=tuple(map(float, cfg["mean"])),
                          std=tuple(map(float, cfg["std"])), interpolation=str(cfg.get("interpolation", "bilinear")))

    def default_tap(self, model: nn.Module) -> str:
        return EMBEDDING

    def blocks(self, model: nn.Module) -> list[Block]:
        """timm's ``feature_info`` stages; a top-level stage also holds the top-level modules
        before it (a stem)."""
        info = getattr(model, "feature_info", None) or []
        modules = [i["module"] for i in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
        children = [n for n, _ in model.named_children()]
        out, start = [], 0
        for m in modules:
            if "." not in m and m in children:
                end = children.index(m) + 1
                out.append(Block(m, tuple(children[start:end]) if end > start else (m,)))
                start = end
            else:
                out.append(Block(m, (m,)))
        return out

    def layout(self, model: nn.Module | None = None) -> Layout:
        model = model if model is not None else self.bare()
        nhwc = None
        if str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC"):  # Swin and kin: stage outputs are NHWC
            blocks = self.blocks(model)
            nhwc = blocks[0].tap.split(".")[0] if blocks else None
        return Layout(nhwc=nhwc, prefix_tokens=int(getattr(model, "num_prefix_tokens", 1) or 1))

    def replace_head(self, model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                     dropout: float = 0.5, in_features: int | None = None) -> Head:
        width = in_features or getattr(model, "num_features", None) or embedding_width(model, 224)
        return add_head(model, int(width), num_classes, head, hidden, dropout)


class TimmSource(Source):
    prefix = "timm"
    package = "timm"
    extra = "timm"

    def backbone(self, model_name: str) -> Backbone:
        timm = _timm()
        arch, _, tag = model_name.partition(".")
        if not timm.is_model(arch) or tag and model_name not in timm.list_models(model_name, pretrained=True):
            if timm.is_model(arch):  # a tag it lacks: its tags
                tags = timm.list_models(f"{arch}.*", pretrained=True)[:8]
                hint = f" (close: {', '.join(tags)})" if tags else ""
            else:
                hint = close_to(arch, timm.list_models())
            raise FeatxError(f"unknown timm model {model_name!r}{hint}; `featx backbones --source timm --filter "
                             f"'*{model_name.split('.')[0][:6]}*'` lists similar ones.")
        return TimmBackbone(f"timm:{model_name}", model_name)

    def models(self, pattern: str | None = None) -> list[str]:
        return _timm().list_models(pattern or "", pretrained=True)


SOURCE = TimmSource()
