#!/usr/bin/env bash
# What each ingredient of scripts/train_transfer3d.sh buys: the recipe in full and with one ingredient left out, each
# trained for EPOCHS epochs of 50 steps (default 8: 400 steps, batch 2) from the same initial weights, then measured on
# the validation pairs of benchmarks/generalisation3d.py (network alone and its ensemble). Needs the benchmark's pairs
# (DATA, written by `benchmarks/generalisation3d.py prepare`). Results: $ROOT/<variant>/validation/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/generalisation3d}
ROOT=${ROOT:-runs/transfer3d_ablations}
EPOCHS=${EPOCHS:-8}
PY="${VENV:-.venv}/bin/python"
declare -A LEAVE_OUT=(
  [full]=""
  [no_synthesis]="--synthesis_prob 0 --synthesis_shapes 0 --synthesis_drop 0 --synthesis_bias 0"
  [narrow_deformation]="--augment_rotate 0 --augment_scale 0 --augment_translate 0 --augment_deform_points 5
                        --augment_deform_random false --augment_gamma 1.25"
)
for name in ${VARIANTS:-full no_synthesis narrow_deformation}; do
  # shellcheck disable=SC2086
  OUT="$ROOT/$name" EPOCHS="$EPOCHS" VAL_INTERVAL="$EPOCHS" SKIP_SETUP=1 bash scripts/train_transfer3d.sh ${LEAVE_OUT[$name]}
  "$PY" benchmarks/generalisation3d.py run --split validation --data "$DATA" --methods network,ensemble \
    --model "$ROOT/$name/stage1/models/registration_model.pt" --out "$ROOT/$name/validation"
done
