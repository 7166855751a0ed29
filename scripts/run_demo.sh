#!/usr/bin/env bash
# Set up (./.venv) and run the main job with the MONAI bundle: train ICON from scratch on the embedded MNIST fives,
# then evaluate it on 80 test pairs. Prints Dice and folds and where the model (bundle/mnist_icon/runs/models) and figures
# (bundle/mnist_icon/eval) are. Extra arguments are bundle overrides for training, e.g. --epochs 10 --lmbda 256.
# Rerunning resumes from bundle/mnist_icon/runs/models/checkpoints (delete bundle/mnist_icon/runs to start over). The shipped, fully
# trained model bundle/mnist_icon/models/model.pt is not touched (evaluate it with evaluate.yaml alone, see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
"$PY" -m monai.bundle run --config_file bundle/mnist_icon/configs/train.yaml --bundle_root bundle/mnist_icon "$@"
"$PY" -m monai.bundle run --config_file "['bundle/mnist_icon/configs/train.yaml','bundle/mnist_icon/configs/evaluate.yaml']" --bundle_root bundle/mnist_icon \
  --model_file bundle/mnist_icon/runs/models/model.pt --eval_dataset mnist --test_pairs 80 "$@"
