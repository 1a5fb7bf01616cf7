"""Make featx/data/backbones.json: what `featx backbones` lists, for the installed torchvision.

    python scripts/make_backbone_table.py

Every model is built on the meta device (RegNet on the CPU) and its default tap measured
with one blank image: about a minute on 2 cores.  Rerun it when torchvision changes (the
command measures live until then, and tests/test_zoo.py fails).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torchvision

    from featx import registry
    from featx.files import write_text
    from featx.taps import describe
    from featx.weights import weights_enum

    t = time.perf_counter()
    models = {}
    for name in registry.available_backbones():
        model = registry.skeleton(name)
        info = describe(name)
        if info["dim"] is None:
            raise SystemExit(f"{name}: {info.get('error')}")
        models[name] = {
            "default_tap": info["default_tap"], "dim": info["dim"],
            "blocks": [b.tap for b in registry.blocks_of(name, model)],
            "aliases": registry.family_of(name).aliases,
            "modules": [n for n, _ in list(model.named_modules())[1:6]],
            "weights": {e.name: os.path.basename(e.url) for e in weights_enum(name) or ()},
        }
    data = {"torchvision": torchvision.__version__.split("+")[0], "models": models}
    write_text(ROOT / "featx" / "data" / "backbones.json", json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(models)} models in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
