"""Decoding: an item of a source -> an 8-bit RGB tensor, shared by every use case.

Extraction, prediction, fine-tuning and its validation all decode here, with the same
guards: a decompression-bomb limit, truncated files as failures, EXIF orientation, alpha on
white, 16-bit scaled, and libjpeg's reduced-scale decoding of large JPEGs.

JPEG files of ordinary size are decoded by torchvision's libjpeg-turbo (``decode_jpeg``),
and every image is resized as a uint8 tensor: together about 1.8x the images/s of Pillow
decoding and resizing (BENCHMARKS.md, ``bench_extract``), with pixels within one grey
level of Pillow's.  Pillow keeps everything else: large JPEGs (its reduced-scale decoding
is faster), other formats and modes, and any file torchvision complains about (so a
truncated file still fails).  torchvision 0.29 deprecates its image decoders for
TorchCodec; where they are gone, Pillow decodes everything (slower, the same pixels).

:class:`Decoded` returns a decode error as a value (never raised inside a DataLoader worker,
never replaced by a neighbouring image), so rows stay aligned with their ids.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; Pillow takes over once it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a future torchvision
    decode_jpeg = None
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from featx.preprocess import Preprocess

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


_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def pixel_limit(max_pixels: int):
    """Pillow's own decompression-bomb check at ``max_pixels``, and truncated files refused,
    while opening and loading an image.

    Pillow checks every image it opens against its module-wide ``MAX_IMAGE_PIXELS`` (about
    89 million): without this, an image above it would be refused whatever ``--max-pixels``
    says; and ``LOAD_TRUNCATED_IMAGES`` (which an application may have set) would fill a cut
    file with gray.  Both are set only for the duration, under a lock, and put back; an image
    over the limit is refused with featx's own sentence.
    """
    with _PILLOW_LIMIT:
        saved, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a gray smear
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                try:
                    yield
                except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
                    m = re.search(r"\((\d+) pixels\)", str(e))
                    raise ValueError(f"decompression bomb: {m.group(1) if m else 'more'} pixels exceed the limit of "
                                     f"{max_pixels} (--max-pixels)") from None
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved, truncated


def open_rgb(source, i: int, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Item ``i`` of ``source`` as an RGB image, guarded; gray when ``pre.grayscale``."""
    with pixel_limit(max_pixels):
        img = source.open(i)
        _check_size(*img.size, max_pixels)
        if pre.jpeg_draft and img.format == "JPEG":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while staying >= the target size
            img.draft("RGB", (pre.resize, pre.resize))
        img.load()
    img = to_rgb(img)
    if pre.grayscale:
        img = img.convert("L").convert("RGB")
    return img


def resize_crop(img, pre: Preprocess):
    """The evaluation geometry: shorter side to ``pre.resize``, centre crop ``pre.crop``
    (of a PIL image, or of a uint8 tensor: faster)."""
    img = TF.resize(img, pre.resize, interpolation=InterpolationMode(pre.interpolation), antialias=True)
    return TF.center_crop(img, pre.crop)


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ValueError(f"decompression bomb: {w}x{h} pixels exceed the limit of {max_pixels} (--max-pixels)")


def jpeg_tensor(data: bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor | None:
    """A JPEG file's bytes decoded by libjpeg-turbo to a uint8 RGB tensor, EXIF orientation
    applied; None where Pillow should decode instead (not a plain RGB or grey JPEG, gray
    wanted, a reduced-scale decode possible, or any complaint from the decoder)."""
    if decode_jpeg is None or pre.grayscale or data[:3] != b"\xff\xd8\xff":
        return None
    with pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as img:  # reads the header only
        (w, h), mode = img.size, img.mode
    _check_size(w, h, max_pixels)
    if mode not in ("RGB", "L") or (pre.jpeg_draft and min(w, h) >= 2 * pre.resize):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "premature end of data" and the like: let Pillow judge
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # see the import
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except Exception:  # noqa: BLE001 - Pillow decodes it or reports the failure
            return None


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
        if self.transform is None:
            data = self.source.read_bytes(i)
            x = jpeg_tensor(data, self.pre, self.max_pixels) if data is not None else None
            if x is None:
                x = TF.pil_to_tensor(open_rgb(self.source, i, self.pre, self.max_pixels))
            return resize_crop(x, self.pre)
        img = open_rgb(self.source, i, self.pre, self.max_pixels)
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
