#!/usr/bin/env bash
# Set up (./.venv) and run the main job with the MONAI bundle: train ICON on the embedded MNIST fives, then
# evaluate it on 80 test pairs. Prints Dice and folds and where the model (bundle/models) and figures
# (bundle/eval) are. Extra arguments are bundle overrides for training, e.g. --epochs 10 --lmbda 256.
# Rerunning resumes from bundle/models/checkpoints (delete bundle/models to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
"$PY" -m monai.bundle run --config_file bundle/configs/train.yaml --bundle_root bundle "$@"
"$PY" -m monai.bundle run --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" --bundle_root bundle
