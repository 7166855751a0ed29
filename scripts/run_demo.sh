#!/usr/bin/env bash
# Set up (./.venv) and run the main job with the MONAI bundle: train ICON from scratch on the embedded MNIST fives,
# then evaluate it on 80 test pairs. Prints Dice and folds and where the model (bundle/runs/models) and figures
# (bundle/eval) are. Extra arguments are bundle overrides for training, e.g. --epochs 10 --lmbda 256.
# Rerunning resumes from bundle/runs/models/checkpoints (delete bundle/runs to start over). The shipped, fully
# trained model bundle/models/model.pt is not touched (evaluate it with evaluate.yaml alone, see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
"$PY" -m monai.bundle run --config_file bundle/configs/train.yaml --bundle_root bundle "$@"
"$PY" -m monai.bundle run --config_file "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']" --bundle_root bundle \
  --model_file bundle/runs/models/model.pt --eval_dataset mnist --test_pairs 80 "$@"
