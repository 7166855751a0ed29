#!/usr/bin/env bash
# Where the refinement's time goes and which schedule to recommend: the --refine preset with other step counts and
# grids, and ANTs SyN, on the validation pairs of benchmarks/generalisation3d.py, one after the other in one shell
# (run it alone on the machine: its seconds are the measurement). MODEL: the model file to refine from.
# Results: $OUT/results.json (one row per schedule) and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
DATA=${DATA:-runs/generalisation3d}
MODEL=${MODEL:-bundle/knee3d_icon/models/brain_transfer_model.pt}
OUT=${OUT:-runs/refine_schedule}
RUN=("$PY" benchmarks/syn_vs_icon.py --datalist "$DATA/datalist.json" --key validation_pairs --out "$OUT"
     --model "$MODEL" --no-syn --refine)
"${RUN[@]}" --tag "refine36-fine18"                                          # the preset
"${RUN[@]}" --tag "refine24-fine8" --io-steps 24 --io-fine-steps 8
"${RUN[@]}" --tag "refine16-fine4" --io-steps 16 --io-fine-steps 4
"${RUN[@]}" --tag "refine24-coarse" --io-steps 24 --io-fine-steps 0
"${RUN[@]}" --tag "refine12-coarse" --io-steps 12 --io-fine-steps 0
"$PY" benchmarks/syn_vs_icon.py --datalist "$DATA/datalist.json" --key validation_pairs --out "$OUT" \
  --syn-transform SyNOnly
