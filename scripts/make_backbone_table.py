"""Make featx/data/backbones.json: what `featx backbones` lists, for the installed torchvision.

    python scripts/make_backbone_table.py

Every model is built on the meta device (RegNet on the CPU) and its default tap measured
with one blank image: about a minute on 2 cores.  Rerun it when torchvision changes (the
command measures live until then, and tests/test_zoo.py fails).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torchvision

    from featx import adapters
    from featx.files import write_text

    t = time.perf_counter()
    models = {}
    tv = adapters.source("torchvision")
    for name in tv.models():
        row = adapters.summary(tv.backbone(name))
        if row["dim"] is None:
            raise SystemExit(f"{name}: {row.get('error')}")
        models[name] = row
    data = {"torchvision": torchvision.__version__.split("+")[0], "models": models}
    write_text(ROOT / "featx" / "data" / "backbones.json", json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(models)} models in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
