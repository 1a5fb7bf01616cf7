"""Write tests/data/golden_v1.h5: a tiny schema-v1 feature file that must keep reading.

Run once when schema v1 was finalised; do not regenerate it for later versions (the point
is that files written by old featx stay readable).
"""

import json
from pathlib import Path

import numpy as np

from featx.store import StoreWriter

out = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden_v1.h5"
header = {
    "backbone": "mobilenet_v2", "weights": "MobileNet_V2_Weights.IMAGENET1K_V1",
    "weights_sha256": "b0353104" + "0" * 56, "weights_path": "",
    "taps": json.dumps({"features": ["features", "avg"], "features.13": ["features.13", "grid2"]}),
    "pooling": json.dumps({"features": "avg", "features.13": "grid2"}),
    "preprocessing": json.dumps({"resize": 96, "crop": 96, "mean": [0.485, 0.456, 0.406],
                                 "std": [0.229, 0.224, 0.225], "interpolation": "bilinear",
                                 "grayscale": False, "jpeg_draft": True}),
    "precision": "float32", "featx_version": "0.1.0", "torch_version": "2.14.1", "torchvision_version": "0.29.1",
    "command": "featx extract golden/ --backbone mobilenet_v2", "created": "2026-11-23T00:00:00+0000",
    "source": json.dumps({"type": "folder", "root": "/golden", "split": None, "n_items": 4}),
    "fingerprint": "golden",
}
taps = {"features": {"layer": "features", "pool": "avg", "dim": 4},
        "features.13": {"layer": "features.13", "pool": "grid2", "dim": 2}}
w = StoreWriter(out, header, n_items=4, taps=taps, unit_items=4).prepare(overwrite=True)
w.add(0, 4, {"features": np.arange(12, dtype=np.float32).reshape(3, 4),
             "features.13": -np.arange(6, dtype=np.float32).reshape(3, 2)},
      np.array([0, 1, 0]), ["a/1.png", "b/2.png", "a/3.png"], ["a/bad.png"], ["UnidentifiedImageError: x"])
w.finalize(["a", "b"], "features")
print("wrote", out)
