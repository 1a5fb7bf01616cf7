"""Compiled, tap-cut inference: the graph of exactly the requested taps, compiled.

torchvision's FX ``create_feature_extractor`` traces the network and keeps only the nodes
the requested taps need: everything after the deepest tap is cut off.  The pooling of each
tap is part of the graph, and every BatchNorm that follows a convolution is folded into it
(``torch.fx.experimental.optimization.fuse``).  ``torch.compile`` (inductor) then fuses the
graph into a few kernels.  Jobs with enough forward work are also *frozen* (the weights
become constants, which lets oneDNN pre-pack them: resnet50 +25 % on 2 CPU cores).
Batches are padded to one shape, so the graph compiles once per run.

Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, by default a folder beside the
feature cache) keeps the compiled code: a second run of the same graph compiles in about
2 s instead of 8-15 (2 CPU cores).  A frozen graph is left out of inductor's graph cache
(only its C++ kernels are kept: about 6 s each run), which is why only jobs of at least
``FREEZE_MIN_GFLOP`` of forward work are frozen.  A network or tap the tracer cannot
handle, or a compiler that fails, leaves the eager :class:`featx.taps.TapRecorder` in
charge, after one warning line.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from featx import registry
from featx.errors import root_cause
from featx.taps import pool

COMPILE_MODES = ("auto", "on", "off")
# `--compile auto` compiles when this process has at least this many images to compute:
# below it the compile time (8-15 s for mobilenet_v2 on 2 CPU cores the first time, a
# few seconds from inductor's cache) is not paid back (BENCHMARKS.md).
AUTO_MIN_IMAGES = {"cpu": 1000, "cuda": 5000}
# Jobs of at least this much forward work (GFLOP: images x the model's GFLOP per image) are
# also frozen: it costs ~4 s more compile time on every run, and saves 5-25 % of the forward
# time (3,000 GFLOP: ~10,000 mobilenet_v2 or ~730 resnet50 images at 224 px).
FREEZE_MIN_GFLOP = 3000.0
# `featx finetune --compile auto` compiles the training step when a run trains on at least
# this many images (training images x epochs).  On a CPU it gained only ~5 % (the time is
# in oneDNN's convolutions, BENCHMARKS.md), so auto waits for long runs there.
AUTO_MIN_TRAIN_IMAGES = {"cpu": 200_000, "cuda": 50_000}


class TapNet(nn.Module):
    """The network cut after its deepest tap, returning every tap pooled.

    Args:
        model: the backbone (eval mode).
        taps: stored name -> (module name, pooling); ``:input`` taps are not supported here.
        nhwc: taps under this module produce channels-last maps (Swin).
    """

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]], nhwc: str | None = None):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        if any(module.endswith(registry.INPUT_SUFFIX) for module, _ in taps.values()):
            raise ValueError("taps on a module's input are recorded by hooks, not cut from the graph")
        from torch.fx.experimental.optimization import fuse

        modules = list(dict.fromkeys(module for module, _ in taps.values()))
        # the graph module has its own containers around the model's layers: fusing in
        # place replaces layers there, and leaves the model itself as it was
        self.body = fuse(create_feature_extractor(model, return_nodes={m: m for m in modules}).eval(), inplace=True)
        self.taps = dict(taps)
        self.nhwc = nhwc

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        nhwc = self.nhwc
        return {name: pool(out[m], how, bool(nhwc) and (m == nhwc or m.startswith(nhwc + "."))).float()
                for name, (m, how) in self.taps.items()}


@contextlib.contextmanager
def inductor_cache(folder: Path | None):
    """Inductor's on-disk cache in ``folder`` while compiling (None: inductor's own default,
    in the system's temporary folder).  Inductor fixes its folder at its first use and keeps
    it in ``TORCHINDUCTOR_CACHE_DIR``: torch's ``temporary_cache_dir`` switches it (and clears
    the in-process caches that remember it) and puts it back afterwards.  A folder set by the
    user in ``TORCHINDUCTOR_CACHE_DIR`` is respected."""
    if folder is None or "TORCHINDUCTOR_CACHE_DIR" in os.environ and not _ours(os.environ["TORCHINDUCTOR_CACHE_DIR"]):
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    Path(folder).mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(Path(folder).resolve())):
        yield


def _ours(folder: str) -> bool:
    """Whether a TORCHINDUCTOR_CACHE_DIR is inductor's own default (set by inductor itself at
    its first use), not a user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(folder) == os.path.abspath(default_cache_dir())


class CompiledTaps:
    """A compiled :class:`TapNet` for batches of one size (smaller batches are padded).

    Raises whatever tracing or compiling raises; :func:`compile_taps` turns that into a
    warning and None.
    """

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]], nhwc: str | None, batch_size: int,
                 example: torch.Tensor, freeze: bool = False, cache_dir: Path | None = None):
        net = TapNet(model, taps, nhwc).eval()
        self.batch_size, self.freeze = batch_size, freeze
        self.fn = torch.compile(net, dynamic=False)
        t = time.perf_counter()
        with inductor_cache(cache_dir):
            self(example[:1])  # compile now (on a padded batch), so that failures surface here
        self.compile_seconds = time.perf_counter() - t

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch._inductor.config as inductor_config

        n = x.shape[0]
        if n < self.batch_size:  # one shape: the graph compiles once
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(memory_format=layout)
        with inductor_config.patch(freezing=self.freeze):
            out = self.fn(x)
        return {k: v[:n] for k, v in out.items()}


def compile_taps(model: nn.Module, taps: dict[str, tuple[str, str]], nhwc: str | None, batch_size: int,
                 example: torch.Tensor, freeze: bool = False, cache_dir: Path | None = None) -> CompiledTaps | None:
    """The compiled graph, or None after one warning line when it cannot be built."""
    try:
        return CompiledTaps(model, taps, nhwc, batch_size, example, freeze, cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure means: run eager
        warnings.warn(f"compiling the network failed ({root_cause(e)}); running it eagerly.", stacklevel=2)
        return None


def gflop_per_image(backbone: str, crop: int) -> float | None:
    """The forward pass's GFLOP per image at ``crop`` px, from torchvision's weights metadata
    (given at 224 px; scaled by area), or None when torchvision does not say."""
    import torchvision

    try:
        ops = list(torchvision.models.get_model_weights(backbone))[0].meta.get("_ops")
    except (ValueError, KeyError, IndexError):
        return None
    return None if ops is None else float(ops) * (crop / 224) ** 2


def should_freeze(backbone: str, crop: int, n_images: int) -> bool:
    """Whether the job's forward work pays for freezing (see ``FREEZE_MIN_GFLOP``)."""
    per_image = gflop_per_image(backbone, crop)
    return per_image is not None and n_images * per_image >= FREEZE_MIN_GFLOP


def should_compile(mode: str, device: torch.device, n_images: int, thresholds: dict = AUTO_MIN_IMAGES) -> bool:
    """``on``, ``off``, or ``auto``: when there are enough images to pay for the compile."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return n_images >= thresholds.get(device.type, thresholds["cuda"])
