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
import json
import os
import time
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from featx import registry
from featx.errors import FeatxError, root_cause
from featx.files import write_text
from featx.taps import Layout, output_tensor, pool

COMPILE_MODES = ("auto", "on", "off")
# `--compile auto` in extraction: the network runs eagerly for AUTO_PROBE_BATCHES batches,
# which measures what an image costs on this machine, and then compiles for the images left
# if the time the compiled graph saves on them (at the speed-up measured for this graph in an
# earlier run, else COMPILED_SPEEDUP: below the 1.6x measured for mobilenet_v2 on 2 CPU cores,
# above resnet50's 1.25x and the transformers' 1.07-1.37x, BENCHMARKS.md) exceeds
# COMPILE_MARGIN times what compiling costs: the time recorded for this graph before
# (CompileRecord), or for a graph never compiled with this cache, COLD_COMPILE_S (8-27 s
# measured for mobilenet_v2 on 2 cores, by machine; 41-46 s for ViT-S, DINOv2-S, ConvNeXt-T).
AUTO_PROBE_BATCHES = 2
COMPILED_SPEEDUP = 1.5
COMPILE_MARGIN = 1.25
COLD_COMPILE_S = {"cpu": 20.0, "cuda": 45.0}
RECORD = "featx-compiled.json"
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
        layout: how the outputs are laid out (channels-last maps, prefix tokens).
    """

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]], layout: Layout | None = None):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        if any(module.endswith(registry.INPUT_SUFFIX) for module, _ in taps.values()):
            raise ValueError("taps on a module's input are recorded by hooks, not cut from the graph")
        from torch.fx.experimental.optimization import fuse

        modules = list(dict.fromkeys(module for module, _ in taps.values()))
        try:
            # the graph module has its own containers around the model's layers: fusing in
            # place replaces layers there, and leaves the model itself as it was
            body = create_feature_extractor(model, return_nodes={m: m for m in modules})
            self.body = fuse(body.eval(), inplace=True)
        except Exception:  # noqa: BLE001 - FX cannot trace it (control flow on values): the whole network
            self.body = Hooked(model, modules)
        self.taps = dict(taps)
        self.layout = layout or Layout()

    def close(self) -> None:
        if isinstance(self.body, Hooked):
            self.body.close()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        lay = self.layout
        return {name: pool(output_tensor(out[m]), how, lay.channels_last(m), lay.prefix_tokens).float()
                for name, (m, how) in self.taps.items()}


class Hooked(nn.Module):
    """The whole network, returning what the tapped modules output (kept by forward hooks):
    for a network FX cannot cut (control flow that depends on values, as in transformers and
    timm's ViTs), torch.compile traces it whole, the hooks inlined.  ``close`` removes the
    hooks."""

    def __init__(self, model: nn.Module, modules: list[str]):
        super().__init__()
        self.model, self.out = model, {}
        named = dict(model.named_modules())
        self._handles = [named[m].register_forward_hook(self._keeper(m)) for m in modules]

    def _keeper(self, name: str):
        def keep(module, args, output):
            self.out.setdefault(name, output)  # the first call wins, as in TapRecorder
        return keep

    def forward(self, x: torch.Tensor) -> dict:
        self.out.clear()
        self.model(x)
        out = dict(self.out)
        self.out.clear()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]], layout: Layout | None, batch_size: int,
                 example: torch.Tensor, freeze: bool = False, cache_dir: Path | None = None):
        self.net = net = own_forward(TapNet(model, taps, layout).eval())
        self.batch_size, self.freeze = batch_size, freeze
        self.fn = torch.compile(net, dynamic=False)
        t = time.perf_counter()
        try:
            with inductor_cache(cache_dir):
                self(example[:1])  # compile now (on a padded batch), so that failures surface here
        except BaseException:
            net.close()
            raise
        self.compile_seconds = time.perf_counter() - t

    def close(self) -> None:
        """Leave the model as it was (a graph that runs it whole hooks its taps)."""
        self.net.close()

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch._inductor.config as inductor_config

        n = x.shape[0]
        if n < self.batch_size:  # one shape: the graph compiles once
            layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(memory_format=layout)
        with inductor_config.patch(freezing=self.freeze), strict_recompiles():
            out = self.fn(x)
        return {k: v[:n] for k, v in out.items()}


def own_forward(module: nn.Module) -> nn.Module:
    """Give ``module`` a ``forward`` of its own: a copy of its class's with a code object of
    its own.  Dynamo keeps compiled graphs, and counts recompiles against its
    ``recompile_limit`` (8), per code object: every TapNet (every network of one class) shared
    one, so from the ninth graph compiled in a process torch.compile ran the network eagerly,
    silently.  The copy goes with the module."""
    f = type(module).forward
    fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    fresh.__kwdefaults__, fresh.__qualname__ = f.__kwdefaults__, f.__qualname__
    module.forward = types.MethodType(fresh, module)
    return module


def strict_recompiles():
    """While running compiled code: hitting dynamo's recompile limit raises (the caller then
    runs eagerly, with a warning) instead of running eagerly unseen."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(fail_on_recompile_limit_hit=True)


def compile_taps(model: nn.Module, taps: dict[str, tuple[str, str]], layout: Layout | None, batch_size: int,
                 example: torch.Tensor, freeze: bool = False, cache_dir: Path | None = None) -> CompiledTaps | None:
    """The compiled graph, or None after one warning line when it cannot be built."""
    try:
        return CompiledTaps(model, taps, layout, batch_size, example, freeze, cache_dir)
    except Exception as e:  # noqa: BLE001 - any failure means: run eager
        warnings.warn(f"compiling the network failed ({root_cause(e)}); running it eagerly.", stacklevel=2)
        return None


def should_freeze(gflop_per_image: float | None, n_images: int) -> bool:
    """Whether the job's forward work pays for freezing (see ``FREEZE_MIN_GFLOP``); an unknown
    cost per image (None) never freezes."""
    return gflop_per_image is not None and n_images * gflop_per_image >= FREEZE_MIN_GFLOP


def should_compile(mode: str, device: torch.device, n_images: int, thresholds: dict = AUTO_MIN_TRAIN_IMAGES) -> bool:
    """Fine-tuning: ``on``, ``off``, or ``auto``: when the run trains on enough images."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return n_images >= thresholds.get(device.type, thresholds["cuda"])


def worth_compiling(seconds_per_image: float, n_images: int, compile_seconds: float,
                    speedup: float = COMPILED_SPEEDUP) -> bool:
    """``--compile auto`` in extraction: whether compiling for ``n_images`` more images pays,
    an image costing ``seconds_per_image`` eagerly, compiling ``compile_seconds``, and the
    compiled graph running ``speedup`` times as fast."""
    if speedup <= 1:
        return False
    saved = n_images * seconds_per_image * (1 - 1 / speedup)
    return saved > COMPILE_MARGIN * compile_seconds


class CompileRecord:
    """The graphs compiled before with one inductor cache, and what compiling them cost:
    ``featx-compiled.json`` beside inductor's cache (None: no record, every graph cold)."""

    def __init__(self, folder: Path | None):
        self.path = Path(folder) / RECORD if folder else None

    def _read(self, warn: bool = True) -> dict:
        """The record; empty (every graph counts as new) when there is none yet or it cannot
        be read, with one warning (``warn``) when it exists but is unreadable or damaged."""
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            if warn:
                warnings.warn(f"cannot read {self.path} ({root_cause(e)}); counting every graph as never "
                              "compiled (the next compile writes it anew).", stacklevel=3)
            return {}
        return data

    def estimate(self, key: str, device: torch.device, freeze: bool) -> float:
        """What compiling this graph will cost: its last warm compile; after only a cold one, a
        quarter of that (a half when frozen: inductor does not cache frozen graphs whole);
        a graph never compiled here: COLD_COMPILE_S."""
        entry = self._read().get(key) or {}
        if "warm_s" in entry:
            return float(entry["warm_s"])
        if "cold_s" in entry:
            return float(entry["cold_s"]) * (0.5 if freeze else 0.25)
        return COLD_COMPILE_S.get(device.type, COLD_COMPILE_S["cuda"])

    def speedup(self, key: str) -> float:
        """How much faster this graph ran compiled than eagerly when it was last measured here,
        else COMPILED_SPEEDUP."""
        entry = self._read(warn=False).get(key) or {}
        return float(entry.get("speedup", COMPILED_SPEEDUP))

    def note(self, key: str, seconds: float | None = None, speedup: float | None = None) -> None:
        """Record a compile (the first of a graph is its cold one), or the speed-up the compiled
        graph was measured at."""
        if self.path is None:
            return
        data = self._read(warn=False)  # a damaged record was reported by estimate(); this replaces it
        entry = data.setdefault(key, {})
        if seconds is not None:
            entry["warm_s" if "cold_s" in entry else "cold_s"] = round(seconds, 2)
        if speedup is not None:
            entry["speedup"] = round(speedup, 3)
        try:
            write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
        except FeatxError as e:  # a record that cannot be written only makes the next estimate cold
            warnings.warn(f"{e}", stacklevel=2)
