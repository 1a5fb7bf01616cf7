"""Taps: pooled outputs of named modules, recorded during one forward pass.

A forward hook on each tapped module pools its output at once (so inplace activations
later in the network cannot alter it, and memory stays small), and the forward pass is cut
short once every tap has fired, so tapping early layers costs only the early layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featx import registry
from featx.errors import FeatxError, root_cause

POOLS = ("avg", "max", "gem", "grid2", "grid3", "grid4")


def pool(t: torch.Tensor, how: str, nhwc: bool = False) -> torch.Tensor:
    """Pool a feature map (N, C, H, W) or token sequence (N, L, D) to (N, D').

    ``nhwc`` marks a channels-last map (N, H, W, C), as Swin's blocks produce.
    """
    if t.ndim == 2:
        return t
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
        nhwc: taps on modules under this name produce channels-last maps (Swin).
    """

    def __init__(self, model: nn.Module, taps: dict[str, tuple[str, str]] | dict[str, str], nhwc: str | None = None):
        self.model, self.nhwc = model, nhwc
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

            channels_last_map = bool(self.nhwc) and (module == self.nhwc or module.startswith(self.nhwc + "."))

            def record(t, wanted=wanted, cl=channels_last_map, module=module):
                for name, how in wanted:
                    if name not in self.out:  # first call wins for modules used twice
                        try:
                            self.out[name] = pool(t, how, cl).float()
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


def map_sizes(model: nn.Module, modules: list[str], x: torch.Tensor, nhwc: str | None = None) -> dict[str, tuple]:
    """(H, W) of what each module (or ``module:input``) produces for ``x``, from one
    forward pass that stops once all have fired; a token sequence (N, L, D) is an L x 1
    map, a vector a 1 x 1 map (as :func:`pool` sees them)."""
    sizes: dict[str, tuple] = {}
    named = dict(model.named_modules())
    handles = []

    def record(module, t):
        if module not in sizes:
            cl = bool(nhwc) and (module == nhwc or module.startswith(nhwc + "."))
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


def widths(model: nn.Module, taps: dict[str, tuple[str, str]], size: int, nhwc: str | None = None) -> dict[str, int]:
    """The width of each tap for ``size`` x ``size`` images: one blank image through ``model``
    on its own device (on the meta device: shapes only, no memory and no compute)."""
    device = next(model.parameters()).device
    with torch.no_grad(), TapRecorder(model, taps, nhwc) as rec:
        out = rec.run(torch.zeros(1, 3, size, size, device=device))
    return {k: int(v.shape[1]) for k, v in out.items()}


def describe(name: str) -> dict:
    """Default tap and its feature dimension, from the meta-device skeleton (no weights, no
    memory); ``error`` says why a dimension could not be measured."""
    model = registry.skeleton(name)
    tap = registry.default_tap(name, model)
    info = {"name": name, "default_tap": tap, "dim": None}
    on_meta = next(model.parameters()).device.type == "meta"
    size = (299 if name == "inception_v3" else 224) if on_meta else 64  # pooled widths do not depend on it
    try:
        info["dim"] = widths(model, {tap: (tap, "avg")}, size, registry.family_of(name).nhwc)[tap]
    except Exception as e:  # noqa: BLE001 - the listing goes on; the reason is kept
        info["error"] = root_cause(e)
    return info
