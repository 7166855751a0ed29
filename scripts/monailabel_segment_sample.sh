#!/usr/bin/env bash
# Segment a sample knee with MONAI Label end to end: start a MONAI Label server on the knee atlas-segmentation
# bundle (scripts/monailabel_server.sh, 127.0.0.1, a free port), wait for it, send it one image, check the label map
# that comes back (on the image's own grid, labels 0/1/2) and print its Dice per label against the image's labels.
# The server is stopped on exit.
#   bash scripts/monailabel_env.sh               # once: MONAI Label's own environment
#   bash scripts/monailabel_segment_sample.sh    # then: one knee, 30 optimisation steps of about 1 s on 2 cores
# The sample is a synthetic left knee that no training used (`monai-icon synthetic-knees --seed 100`: the demo
# trains on seeds 0-15; its 64x64x32 grid at 2.1x2.1x3.75 mm). Environment: PYTHON (MONAI Label's python, default
# ./.venv-monailabel/bin/python; it also makes the sample and computes the Dice), IMAGE and LABEL (segment this image
# and compare with these labels instead), BUNDLE (another bundle folder), PORT (default: a free one), OUT (keep the
# image, labels, returned segmentation and server log there; default: a temporary folder, removed), TIMEOUT (seconds
# to wait for the server, 300), MIN_DICE (exit 1 if a label's Dice is lower, 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv-monailabel/bin/python}
BUNDLE=${BUNDLE:-bundle/knee_atlas_segmentation}
TIMEOUT=${TIMEOUT:-300}
MIN_DICE=${MIN_DICE:-0.5}
NAME=$(basename "$(cd "$BUNDLE" && pwd)")
[ -x "$PYTHON" ] || { echo "no MONAI Label python at $PYTHON: run scripts/monailabel_env.sh first" >&2; exit 2; }
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); KEEP=1
else
  OUT=$(mktemp -d); KEEP=0
fi
SERVER=""
cleanup() {
  if [ -n "$SERVER" ] && kill -0 -- "-$SERVER" 2>/dev/null; then
    kill -TERM -- "-$SERVER" 2>/dev/null || true  # the server's own process group (setsid), its workers included
    for _ in $(seq 30); do kill -0 -- "-$SERVER" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER" 2>/dev/null || true
  fi
  [ "$KEEP" = 1 ] || rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${IMAGE:-}" ]; then
  "$PYTHON" -m monai_icon synthetic-knees "$OUT/sample" --subjects 1 --shape 64,64,32 --spacing 2.1,2.1,3.75 \
    --seed 100 >/dev/null
  IMAGE=$(ls "$OUT"/sample/*_image.nii.gz); LABEL=$(ls "$OUT"/sample/*_label.nii.gz)
fi
[ -f "$IMAGE" ] || { echo "no image at $IMAGE" >&2; exit 2; }
PORT=${PORT:-$("$PYTHON" -c "
import socket
s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1]); s.close()")}

echo "starting MONAI Label on 127.0.0.1:$PORT with $BUNDLE"
PYTHON="$PYTHON" PORT="$PORT" BUNDLE="$BUNDLE" WORK="$OUT/monailabel" \
  setsid bash scripts/monailabel_server.sh >"$OUT/server.log" 2>&1 &
SERVER=$!
START=$SECONDS
until curl -sf "http://127.0.0.1:$PORT/info/" -o "$OUT/info.json"; do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "MONAI Label stopped before it answered; the end of its log:" >&2
    tail -n 40 "$OUT/server.log" >&2
    exit 1
  elif [ $((SECONDS - START)) -ge "$TIMEOUT" ]; then
    echo "MONAI Label did not answer within ${TIMEOUT} s; the end of its log:" >&2
    tail -n 40 "$OUT/server.log" >&2
    exit 1
  fi
  sleep 2
done
echo "server up after $((SECONDS - START)) s"
"$PYTHON" - "$OUT/info.json" "$NAME" <<'PY'
import json
import sys

models = json.load(open(sys.argv[1]))["models"]
labels = models.get(sys.argv[2], {}).get("labels")
if labels != {"femoral_cartilage": 1, "tibial_cartilage": 2}:
    sys.exit(f"the server's models: {sorted(models)}; {sys.argv[2]} labels {labels}")
print(f"model {sys.argv[2]} with labels {labels}")
PY

START=$SECONDS
if ! curl -sf -X POST "http://127.0.0.1:$PORT/infer/$NAME?output=image" -F "file=@$IMAGE" -o "$OUT/seg.nii.gz"; then
  echo "inference request failed; the end of the server's log:" >&2
  tail -n 40 "$OUT/server.log" >&2
  exit 1
fi
echo "segmented $(basename "$IMAGE") in $((SECONDS - START)) s"
"$PYTHON" - "$IMAGE" "$OUT/seg.nii.gz" "${LABEL:-}" "$MIN_DICE" <<'PY'
import sys

import nibabel as nib
import numpy as np

image_file, seg_file, label_file, min_dice = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
image, seg = nib.load(image_file), nib.load(seg_file)
labels = np.asarray(seg.dataobj).squeeze()
if labels.shape != image.shape or not np.allclose(seg.affine, image.affine, atol=1e-3):
    sys.exit(f"the segmentation is not on the image's grid: {labels.shape} vs {image.shape}")
values = sorted(int(v) for v in np.unique(labels))
if not set(values) <= {0, 1, 2} or not {1, 2} <= set(values):
    sys.exit(f"the segmentation holds labels {values}, expected 0, 1 and 2")
print(f"label map {labels.shape}, labels {values}")
if label_file:
    truth = np.asarray(nib.load(label_file).dataobj).squeeze()
    low = []
    for value, name in ((1, "femoral_cartilage"), (2, "tibial_cartilage")):
        a, b = labels == value, truth == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        print(f"Dice {name}: {dice:.3f}")
        low += [name] if dice < min_dice else []
    if low:
        sys.exit(f"Dice below {min_dice} for {low}")
PY
[ "$KEEP" = 1 ] && echo "image, segmentation and server log in $OUT"
echo "done"
