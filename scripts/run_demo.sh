#!/usr/bin/env bash
# Set up (./.venv) and run the main job: train + evaluate ICON on the embedded MNIST fives, print Dice and
# folds, save a figure and the model under outputs/icon_2d/. Extra arguments go to examples/train_icon_2d.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" examples/train_icon_2d.py "$@"
