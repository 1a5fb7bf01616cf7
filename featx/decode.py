"""Decoding: an item of a source -> an 8-bit RGB tensor, shared by every use case.

Extraction, prediction, fine-tuning and its validation all decode here, with the same
guards: a decompression-bomb limit, truncated files as failures, EXIF orientation, alpha on
white, 16-bit scaled, and libjpeg's reduced-scale decoding of large JPEGs.

:class:`Decoded` returns a decode error as a value (never raised inside a DataLoader worker,
never replaced by a neighbouring image), so rows stay aligned with their ids.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from featx.preprocess import Preprocess

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a gray smear

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF orientation applied, alpha composited on white,
    16-bit and float images scaled (not clipped) to 8 bits, CMYK/palette/gray converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255):
            a = a / 257.0  # 16-bit range -> 8-bit range
        elif img.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(source, i: int, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Item ``i`` of ``source`` as an RGB image, guarded; gray when ``pre.grayscale``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = source.open(i)
        w, h = img.size
        if w * h > max_pixels:
            raise ValueError(f"decompression bomb: {w}x{h} pixels exceeds the limit of {max_pixels}")
        if pre.jpeg_draft and img.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while staying >= the target size
            img.draft("RGB", (pre.resize, pre.resize))
        img.load()
    img = to_rgb(img)
    if pre.grayscale:
        img = img.convert("L").convert("RGB")
    return img


def resize_crop(img: Image.Image, pre: Preprocess) -> Image.Image:
    """The evaluation geometry: shorter side to ``pre.resize``, centre crop ``pre.crop``."""
    img = TF.resize(img, pre.resize, interpolation=InterpolationMode(pre.interpolation), antialias=True)
    return TF.center_crop(img, pre.crop)


@dataclass
class Decoded(torch.utils.data.Dataset):
    """Dataset over a source yielding ``(uint8 CHW tensor | None, index, error | None)``.

    Normalisation is left to the consumer (:class:`featx.preprocess.Normalizer`), once per
    batch on the device; shipping uint8 between processes is also 4x cheaper than float32.

    Args:
        source: the images.
        pre: the preprocessing record.
        max_pixels: larger images are refused as decompression bombs.
        transform: a random PIL -> PIL transform (training augmentation) instead of the
            plain resize + centre crop.  Indexed by ``(i, epoch)``, it draws its randomness
            from a generator seeded by ``(seed, epoch, i)``: the same image gets the same
            augmentation in the same epoch whatever the worker count, order or a resume.
        seed: see ``transform``.
    """

    source: object
    pre: Preprocess
    max_pixels: int = DEFAULT_MAX_PIXELS
    transform: Callable | None = None
    seed: int = 0

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int, epoch: int = 0) -> torch.Tensor:
        img = open_rgb(self.source, i, self.pre, self.max_pixels)
        if self.transform is None:
            return TF.pil_to_tensor(resize_crop(img, self.pre))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{i}".encode()))
            return TF.pil_to_tensor(self.transform(img))

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        try:
            return self.load(i, epoch), i, None
        except Exception as e:  # any decoder error becomes a recorded failure
            msg = str(e).splitlines()[0] if str(e) else ""
            return None, i, f"{type(e).__name__}: {msg}".strip()


def collate(items):
    """Batch the good images; keep (index, error) of the bad ones beside them."""
    good = [(t, i) for t, i, e in items if e is None]
    bad = [(i, e) for t, i, e in items if e is not None]
    x = torch.stack([t for t, _ in good]) if good else None
    return x, [i for _, i in good], bad
