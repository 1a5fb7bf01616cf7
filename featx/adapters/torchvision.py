"""torchvision's classification models (a bare ``--backbone`` name): the registry's families,
torchvision's weights API and the head surgery of :mod:`featx.heads`."""

from __future__ import annotations

from torch import nn

from featx import heads, registry, weights
from featx.adapters import Backbone, Layout, Source
from featx.heads import Head
from featx.preprocess import Preprocess
from featx.registry import Block
from featx.weights import Weights


class TorchvisionBackbone(Backbone):
    source = "torchvision"

    def resolve_weights(self, spec: str | None, seed: int = 0) -> Weights:
        return weights.resolve_weights(self.model_name, spec, seed)

    def identify(self, w: Weights) -> Weights:
        return weights.identify(self.model_name, w)

    def load(self, w: Weights) -> tuple[nn.Module, Weights]:
        return weights.load_backbone(self.model_name, w)

    def skeleton(self, w: Weights | None = None) -> nn.Module:
        return weights.skeleton_for(self.model_name, w) if w is not None else registry.skeleton(self.model_name)

    def preprocess(self, w: Weights) -> Preprocess:
        return weights.preprocess_for(self.model_name, w)

    def gflop(self, crop: int) -> float | None:
        return weights.gflop_per_image(self.model_name, crop)

    def default_tap(self, model: nn.Module) -> str:
        return registry.default_tap(self.model_name, model)

    def aliases(self) -> dict[str, str]:
        return registry.family_of(self.model_name).aliases

    def blocks(self, model: nn.Module) -> list[Block]:
        return registry.blocks_of(self.model_name, model)

    def layout(self, model: nn.Module | None = None) -> Layout:
        return Layout(nhwc=registry.family_of(self.model_name).nhwc)

    def known_weights(self) -> dict[str, str]:
        import os

        return {e.name: os.path.basename(e.url) for e in weights.weights_enum(self.model_name) or ()}

    def replace_head(self, model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512,
                     dropout: float = 0.5) -> Head:
        return heads.replace_head(model, num_classes, head, hidden, dropout)


class TorchvisionSource(Source):
    prefix = "torchvision"
    package = "torchvision"

    def backbone(self, model_name: str) -> Backbone:
        registry.check_backbone(model_name)
        return TorchvisionBackbone(model_name, model_name)

    def models(self, pattern: str | None = None) -> list[str]:
        import fnmatch

        names = registry.available_backbones()
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


SOURCE = TorchvisionSource()
