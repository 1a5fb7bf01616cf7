"""What ``featx backbones`` lists, without importing torch: a table of torchvision's models.

For each model torchvision knows: its default tap and that tap's width, its blocks (the unit
of ``finetune --unfreeze`` and of ``sweep``), tap aliases, its first module names, and the
file names of its ImageNet weights.  ``featx/data/backbones.json`` holds the table for one
torchvision version; scripts/make_backbone_table.py makes it from the registry and the
meta-device skeletons (tests/test_zoo.py checks it against them).  For another torchvision
version, :func:`table` says so, and the command measures live instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
from pathlib import Path

TABLE = "backbones.json"


def torchvision_version() -> str | None:
    """The installed torchvision's version, without a local label (``+cu130``)."""
    try:
        return importlib.metadata.version("torchvision").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def table() -> dict | None:
    """The shipped table, or None when it was made for another torchvision than the one installed."""
    data = json.loads(importlib.resources.files("featx").joinpath("data", TABLE).read_text())
    return data if data.get("torchvision") == torchvision_version() else None


def hub_checkpoints() -> Path:
    """torch's hub cache of weights files, found as ``torch.hub.get_dir()`` finds it
    (``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub``)."""
    home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def local(files: dict[str, str]) -> list[str]:
    """The weights (name -> file name) whose file is in the hub cache."""
    hub = hub_checkpoints()
    return [name for name, file in files.items() if (hub / file).is_file()]
