"""Taps: pooled outputs of named modules, recorded during one forward pass.

A forward hook on each tapped module pools its output at once (so inplace activations
later in the network cannot alter it, and memory stays small), and the forward pass is cut
short once every tap has fired, so tapping early layers costs only the early layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featx import registry
from featx.errors import FeatxError

POOLS = ("avg", "max", "gem", "grid2", "grid3", "grid4", "cls", "mean", "clsmean")
TOKEN_POOLS = ("cls", "mean", "clsmean")  # of a token sequence only


@dataclass(frozen=True)
class Layout:
    """How a network's tapped outputs are laid out, for pooling (each backbone adapter says).

    nhwc: taps under this module produce channels-last maps (N, H, W, C) (Swin's ``features``).
    prefix_tokens: a token sequence (N, L, D) starts with this many tokens that are not
        patches (the CLS token first, then register tokens).
    """

    nhwc: str | None = None
    prefix_tokens: int = 1

    def channels_last(self, module: str) -> bool:
        return bool(self.nhwc) and (module == self.nhwc or module.startswith(self.nhwc + "."))


def pool(t: torch.Tensor, how: str, nhwc: bool = False, prefix_tokens: int = 1) -> torch.Tensor:
    """Pool a feature map (N, C, H, W) or token sequence (N, L, D) to (N, D').

    ``nhwc`` marks a channels-last map (N, H, W, C), as Swin's blocks produce.  Token
    sequences also pool as ``cls`` (the first token), ``mean`` (the mean of the patch tokens:
    without the ``prefix_tokens`` CLS and register tokens) and ``clsmean`` (both, concatenated,
    as DINOv2's linear evaluation does); ``avg`` and the others treat every token alike.
    """
    if t.ndim == 2:
        return t
    if how in TOKEN_POOLS:
        if t.ndim != 3:
            raise FeatxError(f"--pool {how} pools a transformer's tokens, and this layer gives a {t.ndim - 1}-d map; "
                             "use avg, max, gem or gridK here.")
        cls, patches = t[:, 0], t[:, prefix_tokens:]
        if how == "cls":
            return cls
        if patches.shape[1] == 0:
            raise FeatxError(f"--pool {how}: this layer's {t.shape[1]} token(s) hold no patch token.")
        return patches.mean(1) if how == "mean" else torch.cat([cls, patches.mean(1)], 1)
    if t.ndim == 3:  # transformer tokens: pool over the sequence
        t = t.transpose(1, 2).unsqueeze(-1)
    elif nhwc:
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4:
        return t.flatten(1)
    if how == "avg":
        return t.mean((2, 3))
    if how == "max":
        return t.amax((2, 3))
    if how == "gem":  # generalised mean (p=3) of Radenović et al.; assumes activations >= 0
        return t.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3)
    if how.startswith("grid"):
        k = int(how[4:])
        if k > min(t.shape[2], t.shape[3]):  # a finer grid than the map repeats its cells (and can fill memory)
            raise FeatxError(f"--pool {how} asks for a {k}x{k} grid, but the tapped map is {t.shape[2]}x{t.shape[3]}; "
                             f"use gridK with K <= {min(t.shape[2], t.shape[3])}, or tap an earlier layer.")
        return F.adaptive_avg_pool2d(t, k).flatten(1)
    raise FeatxError(f"unknown pooling {how!r}; allowed: {', '.join(POOLS)}.")


def output_tensor(out):
    """A module's output as one tensor: a transformers layer returns a tuple (hidden states
    first) or a ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # transformers' ModelOutput
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def check_pool(how: str) -> str:
    if how not in POOLS and not (how.startswith("grid") and how[4:].isdigit() and int(how[4:]) > 0):
        raise FeatxError(f"unknown pooling {how!r}; allowed: {', '.join(POOLS)} (gridK for any K).")
    return how


class _Done(Exception):
    """Raised by the last hook to fire: the rest of the network is not needed."""


class TapRecorder:
    """Forward hooks that pool the outputs of named modules during one forward pass.

    Args:
        model: the network.
        taps: stored name -> (module name, pooling); a module name ending in ``:input``
            records the module's input instead of its output.
        layout: how the outputs are laid out (channels-last maps, prefix tokens).
    """

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]] | dict[str, str],
                 layout: Layout | None = None):
        self.model, self.layout = model, layout or Layout()
        # accept {module: pool} as a shorthand
        self.taps = {k: (v if isinstance(v, tuple) else (k, v)) for k, v in taps.items()}
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "TapRecorder":
        by_module: dict[str, list[tuple[str, str]]] = {}
        for name, (module, how) in self.taps.items():
            by_module.setdefault(module, []).append((name, how))
        modules = dict(self.model.named_modules())
        for module, wanted in by_module.items():
            is_input = module.endswith(registry.INPUT_SUFFIX)
            m = modules[module[: -len(registry.INPUT_SUFFIX)] if is_input else module]

            def record(t, wanted=wanted, cl=self.layout.channels_last(module), module=module):
                t = output_tensor(t)
                for name, how in wanted:
                    if name not in self.out:  # first call wins for modules used twice
                        try:
                            self.out[name] = pool(t, how, cl, self.layout.prefix_tokens).float()
                        except FeatxError as e:
                            raise FeatxError(f"tap {module}: {e}") from None
                if len(self.out) == len(self.taps):
                    raise _Done

            if is_input:
                h = m.register_forward_pre_hook(lambda mod, args, record=record: record(args[0]))
            else:
                h = m.register_forward_hook(lambda mod, args, out, record=record: record(out))
            self._handles.append(h)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.out = {}
        try:
            self.model(x)
        except _Done:
            pass
        missing = set(self.taps) - set(self.out)
        if missing:
            raise FeatxError(f"layers {sorted(missing)} were never called in the forward pass.")
        return self.out


def map_sizes(model: nn.Module, modules: list[str], x: torch.Tensor, layout: Layout | None = None) -> dict[str, tuple]:
    """(H, W) of what each module (or ``module:input``) produces for ``x``, from one
    forward pass that stops once all have fired; a token sequence (N, L, D) is an L x 1
    map, a vector a 1 x 1 map (as :func:`pool` sees them)."""
    sizes: dict[str, tuple] = {}
    named = dict(model.named_modules())
    handles = []

    layout = layout or Layout()

    def record(module, t):
        t = output_tensor(t)
        if module not in sizes:
            cl = layout.channels_last(module)
            sizes[module] = (tuple(t.shape[1:3]) if cl else tuple(t.shape[2:4])) if t.ndim == 4 else \
                (int(t.shape[1]), 1) if t.ndim == 3 else (1, 1)
        if len(sizes) == len(modules):
            raise _Done

    for module in modules:
        is_input = module.endswith(registry.INPUT_SUFFIX)
        m = named[module[: -len(registry.INPUT_SUFFIX)] if is_input else module]
        if is_input:
            handles.append(m.register_forward_pre_hook(lambda mod, args, k=module: record(k, args[0])))
        else:
            handles.append(m.register_forward_hook(lambda mod, args, out, k=module: record(k, out)))
    try:
        with torch.inference_mode():
            model(x)
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    return sizes


def widths(model: nn.Module, taps: dict[str, tuple[str, str]], size: int, layout: Layout | None = None) -> dict[str, int]:
    """The width of each tap for ``size`` x ``size`` images: one blank image through ``model``
    on its own device (on the meta device: shapes only, no memory and no compute)."""
    device = next(model.parameters()).device
    with torch.no_grad(), TapRecorder(model, taps, layout) as rec:
        out = rec.run(torch.zeros(1, 3, size, size, device=device))
    return {k: int(v.shape[1]) for k, v in out.items()}
