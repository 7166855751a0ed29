#!/usr/bin/env bash
# Serve the knee atlas-segmentation bundle with MONAI Label's monaibundle app, offline, on 127.0.0.1.
#   bash scripts/monailabel_env.sh                          # once: MONAI Label's own environment
#   bash scripts/monailabel_server.sh                       # then: start the server (Ctrl-C stops it)
#   curl -X POST "http://127.0.0.1:8000/infer/knee_atlas_segmentation?output=image" -F "file=@knee.nii.gz" -o seg.nii.gz
# Environment: PYTHON (MONAI Label's python, default ./.venv-monailabel/bin/python), PORT (8000), BUNDLE (the bundle
# folder, default bundle/knee_atlas_segmentation; it needs models/model.pt: scripts/make_knee_atlas_bundle.py),
# STUDIES (image folder shown to MONAI Label clients; default an empty folder), WORK (scratch folder for the app).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-monailabel/bin/python}
PORT=${PORT:-8000}
BUNDLE=$(cd "${BUNDLE:-bundle/knee_atlas_segmentation}" && pwd)
WORK=${WORK:-runs/monailabel}
NAME=$(basename "$BUNDLE")
[ -x "$PYTHON" ] || { echo "no MONAI Label python at $PYTHON: run scripts/monailabel_env.sh first" >&2; exit 2; }
[ -f "$BUNDLE/models/model.pt" ] || { echo "$BUNDLE/models/model.pt is missing: run scripts/make_knee_atlas_bundle.py" >&2; exit 2; }
SAMPLE=$("$PYTHON" -c "import sys, os; print(os.path.join(sys.prefix, 'monailabel', 'sample-apps', 'monaibundle'))")
mkdir -p "$WORK"
rm -rf "$WORK/app"
cp -r "$SAMPLE" "$WORK/app"
mkdir -p "$WORK/app/model" "${STUDIES:=$WORK/studies}"
ln -sfn "$BUNDLE" "$WORK/app/model/$NAME"
ML_BIN=$(cd "$(dirname "$PYTHON")" && pwd)
export MONAILABEL_PYEXE="$ML_BIN/$(basename "$PYTHON")"  # MONAI Label's launcher runs `python` from PATH otherwise
exec "$ML_BIN/monailabel" start_server --app "$WORK/app" --studies "$STUDIES" \
  --conf models "$NAME" --conf zoo_source github --conf sam2 false --conf skip_trainers true \
  --host 127.0.0.1 --port "$PORT"
