"""The preprocessing record: how an image becomes the network's input, and its normalisation.

:class:`Preprocess` is stored as JSON in every feature file and fine-tuned network, so the
same pixels can be made again by ``predict``; :class:`Normalizer` is the one place where
uint8 batches become normalised float tensors (extraction, fine-tuning, validation).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch


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


class Normalizer:
    """uint8 batches (N, 3, H, W) -> float on ``device``, normalised by the record's mean and std.

    Decoding ships uint8 (4x cheaper between processes than float32); normalising once per
    batch on the device is cheaper than per image.

    Args:
        pre: the preprocessing record (mean and std in [0, 1] units).
        device: where the batch goes.
        channels_last: return an NHWC-strided tensor (faster convolutions on CUDA and oneDNN).
    """

    def __init__(self, pre: Preprocess, device: torch.device, channels_last: bool = True):
        self.device, self.channels_last = device, channels_last
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
