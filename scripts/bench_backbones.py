"""Benchmark the backbones of other sources (timm, Hugging Face, open_clip) in featx against
the library's own forward pass, eager and compiled, and `featx extract` end to end.

Random weights (speed does not depend on the values), 224 px, featx's batch size, the same
JPEG photos as scripts/bench_extract.py.  Each model is measured in a fresh process:

* library eager -- the library's own embedding function (timm's pre-logits features,
                   transformers' pooled output, open_clip's ``encode_image``) on the decoded,
                   normalised batch in PyTorch's default layout, ``torch.inference_mode``:
                   what a user writes by hand;
* featx eager   -- featx's extractor on the same uint8 batch (normalisation, layout, tap);
* featx compiled -- the same through featx's compiled graph (FX tap-cut where the network
                   traces, else the whole network compiled with hooked taps), compiled before
                   the clock starts; the compile itself is timed on its own, from an empty
                   inductor cache;
* featx extract -- the command, end to end, ``--compile off`` and ``--compile auto`` (a
                   first run: empty caches).

The HF model is a DINOv2-small-sized network (Dinov2Config: hidden 384, 12 layers, 6 heads,
patch 14) saved with ``save_pretrained`` and named ``hf:FOLDER``, with the preprocessing of
facebook/dinov2-small (shorter side 256, centre crop 224).

    python scripts/bench_backbones.py [--n 256] [--n-command 512] [--models ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import FEATX, child, make_jpegs  # noqa: E402
from benchlib import ROOT, machine, update_section  # noqa: E402

RESULTS = ROOT / "cache" / "bench_backbones.json"  # each model's last figures

MODELS = {
    "timm:vit_small_patch16_224": "timm ViT-S/16",
    "hf:DINO": "HF DINOv2-S/14 (random)",
    "open_clip:ViT-B-32": "open_clip ViT-B/32",
    "timm:convnext_tiny": "timm ConvNeXt-T",
}

CHILD = """
import json, sys, time, torch
from pathlib import Path
from featx.decode import Decoded
from featx.extractor import ExtractConfig, FeatureExtractor
from featx.graph import compile_taps
from featx.sources import folder_source
backbone, data, n, inductor = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
weights = backbone.split(":", 1)[1] if backbone.startswith("hf:") else "none"
ex = FeatureExtractor(ExtractConfig(backbone=backbone, weights=weights, compile="off", cache=None))
ds = Decoded(folder_source(data), ex.pre)
x = torch.stack([ds[i][0] for i in range(min(n, len(ds)))])
b = ex.config.batch_size
source, name = backbone.split(":", 1)
torch.manual_seed(0)
if source == "timm":
    import timm
    own = timm.create_model(name, pretrained=False).eval()
    embed = lambda u: own.forward_head(own.forward_features(u), pre_logits=True)
elif source == "hf":
    from transformers import AutoModel
    own = AutoModel.from_pretrained(name).eval()
    embed = lambda u: own(pixel_values=u).pooler_output
else:
    import open_clip
    own = open_clip.create_model(name, pretrained=None).eval()
    embed = own.encode_image
def rate(fn):
    fn(x[:b])  # warm-up
    t = time.perf_counter()
    for s in range(0, len(x), b):
        fn(x[s:s + b])
    return len(x) / (time.perf_counter() - t)
def library(u):
    with torch.inference_mode():
        return embed(ex.normalize(u).contiguous())
out = {"library": rate(library), "eager": rate(ex)}
t = time.perf_counter()
example = ex.normalize(torch.zeros(1, 3, ex.pre.crop, ex.pre.crop, dtype=torch.uint8))
with torch.inference_mode():
    ex.compiled = compile_taps(ex.model, ex.taps, ex.layout, b, example, freeze=False, cache_dir=Path(inductor))
out["compile_s"] = time.perf_counter() - t
out["graph"] = None if ex.compiled is None else ("whole, hooked" if type(ex.compiled.net.body).__name__ == "Hooked" else "FX cut")
out["compiled"] = rate(ex) if ex.compiled is not None else None
print(json.dumps(out))
"""


def dino_folder(root: Path) -> Path:
    """A DINOv2-small-sized model saved by transformers, with dinov2-small's preprocessing."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    folder = root / "dinov2-small-random"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                             image_size=518)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "resample": 3, "size": {"shortest_edge": 256}}))
    return folder


def run(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return p


def command(backbone: str, weights: str, data: Path, mode: str, cache: Path, out: Path) -> tuple[float, str]:
    env = {"FEATX_CACHE": str(cache)}
    t = time.perf_counter()
    p = run(FEATX + ["extract", str(data), "--backbone", backbone, "--weights", weights, "--compile", mode,
                     "--out", str(out), "--overwrite"], env)
    return time.perf_counter() - t, (p.stdout + p.stderr).strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images of the forward-pass measures")
    ap.add_argument("--n-command", type=int, default=512, help="images of the `featx extract` runs (0: none)")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = make_jpegs(tmp / "photos", max(a.n, a.n_command))
        forward = tmp / "forward"
        make_jpegs(forward, a.n)
        dino = dino_folder(tmp)
        for key in a.models:
            backbone = f"hf:{dino}" if key == "hf:DINO" else key
            r = child(CHILD, backbone, forward, a.n, tmp / f"inductor-{len(rows)}")
            r.update(model=MODELS[key], backbone=key)
            if a.n_command:
                weights = str(dino) if key == "hf:DINO" else "none"
                for mode in ("off", "auto"):
                    wall, line = command(backbone, weights, photos, mode, tmp / f"cache-{key}-{mode}",
                                         tmp / "f.h5")
                    r[f"command_{mode}"], r[f"line_{mode}"] = wall, line
            print(json.dumps(r), flush=True)
            rows.append(r)
    if a.no_write:
        return
    # each model's last figures are kept, so one model can be measured again on its own
    kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    kept.update({r["backbone"]: {**r, "n": a.n, "n_command": a.n_command} for r in rows})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(kept, indent=1))
    render([kept[k] for k in MODELS if k in kept])


def render(rows: list[dict]) -> None:
    n, n_command = rows[0]["n"], rows[0]["n_command"]
    lines = ["| backbone | library eager | featx eager | featx compiled (graph) | compile | "
             f"`featx extract`, {n_command} photos: off | auto |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        comp = (f"{r['compiled']:.1f} img/s ({r['compiled'] / r['library']:.2f}x; {r['graph']})"
                if r["compiled"] else "failed: eager")
        cmd = (f"{r['command_off']:.1f} s | {r['command_auto']:.1f} s" if "command_off" in r else "- | -")
        lines.append(f"| {r['model']} (`{r['backbone']}`) | {r['library']:.1f} img/s | {r['eager']:.1f} img/s "
                     f"({r['eager'] / r['library']:.2f}x) | {comp} | {r['compile_s']:.0f} s | {cmd} |")
    update_section("bench_backbones", f"""
Machine: {machine()}.  `python scripts/bench_backbones.py --n {n} --n-command {n_command}`: random
weights, 224 px, batch 32, forward passes on {n} decoded photos in a fresh process per model (ratios
against the library's own eager forward pass in the same process); `featx extract` end to end on
{n_command} JPEG photos, empty caches.

{chr(10).join(lines)}
""")


if __name__ == "__main__":
    main()
