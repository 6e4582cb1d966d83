#!/usr/bin/env bash
# The quickstart (`make main`): train the small Mask R-CNN of configs/quickstart/ from scratch
# on the synthetic shapes data, evaluate it on the held-out split (the COCO table is printed),
# draw its detections on validation images, plot the loss and AP curves, and print the wall
# time of all of it. Arguments are passed to `detframe train` (e.g. SOLVER.MAX_ITER=200).
#
#   tools/quickstart.sh [KEY=VALUE ...]        (DETFRAME=path/to/detframe, OUT=output dir)
set -euo pipefail
cd "$(dirname "$0")/.."
detframe=${DETFRAME:-.venv/bin/detframe}
config=configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml
out=${OUT:-output/quickstart}
start=$(date +%s)
"$detframe" train "$config" OUTPUT_DIR="$out" "$@"
"$detframe" demo "$config" --weights "$out/model_final.pth" --dataset shapes_val --limit 12 \
  --output "$out/pictures"
"$detframe" plot "$out" --output "$out/curves.png"
echo "quickstart: $(( $(date +%s) - start )) s wall time; results in $out (pictures/, curves.png)"
