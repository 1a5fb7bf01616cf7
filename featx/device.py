"""Where the network runs and in what precision."""

from __future__ import annotations

import torch

from featx.errors import FeatxError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise FeatxError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"--device {spec} asked for a GPU but torch sees none; use --device cpu.")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None: plain float32).

    ``auto`` is bf16 (fp16 where bf16 is not supported) on CUDA and float32 on the CPU,
    where autocast would only add casts.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise FeatxError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    return table[precision]
