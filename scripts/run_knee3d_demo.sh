#!/usr/bin/env bash
# The 3D path end to end on CPU (about half an hour on a 2-core CPU): synthetic knees -> datalist ->
# stage 1 (two U-Net steps at half resolution) -> stage 2 (stage 1 frozen + a full-resolution step) -> evaluation with
# per-label Dice, folds and time per pair -> `monai-icon register-pairs` on the test pairs' files with instance
# optimisation (label Dice before/after on each fixed grid) -> `monai-icon register` on one pair of files
# (physical space, ITK transform). Uses a 64x64x32 network grid instead of the paper's 192x192x80 so that it fits a CPU.
# Everything goes to runs/knee3d_demo (delete it to start over; reruns resume from the last checkpoints).
# Set DATA=real to run on deformed copies of the embedded ITK T1 head volume (6 k-means labels) with the recipe chosen
# for it (docs/train_3d.md): one stage whose two U-Net steps run on a 64x32x64 grid while the loss compares the images
# at 128x64x128 (the volume reoriented to RAS is 128x62x128 voxels of 2x3x2 mm). This trains the shipped model
# bundle/knee3d_icon/models/t1head_registration_model.pt.
# VARIANT=twostage (DATA=real) runs the knees' two-stage recipe on it instead, VARIANT=augmented one stage on the
# 64x32x64 grid; OUT=... writes elsewhere; the default real recipe first trains WARM_EPOCHS epochs of 50 steps (24 by
# default) with its loss on the images at half resolution (half the cost per step), then EPOCHS_FINE (16 by default)
# with the loss on the full-resolution images, starting from those weights (docs/train_3d.md).
# WARM_EPOCHS=0 EPOCHS_FINE=28 trains the main stage alone. LR sets the peak learning rate (default 5e-4) and LR_FINE
# that of the main stage after a warm-up stage (default LR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
DATA=${DATA:-knees}
# the two-stage recipe (stage 1 on 32x32x16, stage 2 on 64x64x32); VARIANT=augmented changes these for DATA=real
FULL="[64,64,32]"; EPOCHS=30; FINAL=stage2; TARGET=32; AUGMENT=(); BATCH=4; START=1; RECIPE_EXTRA=()
WARM_RUN=0; WARM=()  # epochs of a warm-up stage with the loss at half resolution (DATA=real only)
if [ "$DATA" = real ]; then
  OUT=${OUT:-runs/t1head_demo}
  [ -f "$OUT/datalist.json" ] || "$PY" -c "
from monai_icon.data import build_knee_datalist, write_datalist, write_deformed_copies
write_deformed_copies('$OUT/volumes', num_copies=16, deformation_mm=6.0, seed=0)
write_datalist(build_knee_datalist('$OUT/volumes', 0.25, 8, require_side=False, relative_to='$OUT', val_fraction=0.2, num_val_pairs=6), '$OUT/datalist.json')"
  # non-knee data: no side; every volume is brought to one canonical orientation (RAS), whatever its array order
  DATA_ARGS=(--target_side '$None' --axcodes RAS --num_classes 7 --label_names "{1: 'class1', 2: 'class2', 3: 'class3', 4: 'class4', 5: 'class5', 6: 'class6'}")
  VARIANT=${VARIANT:-fine}
  if [ "$VARIANT" = augmented ]; then
    # one stage on a 64x32x64 grid (full_size 128x64x128 halved): the 32x16x32 stage 1 cannot see the 2 mm labels,
    # and a second stage at 128x64x128 does not fit the budget; every training image gets a new smooth random
    # deformation and intensity gamma per step (9 training volumes are memorised otherwise), which folds more at
    # the same lambda: it ends on 128 instead of 32
    FULL="[128,64,128]"; EPOCHS=12; FINAL=stage1; TARGET=128
    AUGMENT=(--augment_deform 1.5 --augment_gamma 1.25)
  elif [ "$VARIANT" = fine ]; then
    # one stage whose two U-Net steps run on 2x pooled inputs (64x32x64) and whose loss compares the images at
    # 128x64x128 (LNCC, window 5), GradICON on the steps' own grid, the composed map resampled there (cheaper);
    # augmentation (3 voxels of the 128 grid = 1.5 of the steps' grid), batch 2, lambda 1 -> 4; channels-last; the
    # LNCC summed over the images and their 2x and 4x pooled copies.
    # Cheaper steps, so that more of them fit the time: validation every 4 epochs; on CPUs with AMX tiles the
    # networks' forward pass in bfloat16 (float32 elsewhere); GradICON at a random quarter of its points each step
    # (unbiased, the same validation Dice); the LNCC compiled in training (part of the bundle's cpu_backend: auto).
    # A warm-up stage first: the same network (the same two U-Nets on the same 64x32x64 grid) trained with its loss
    # on the images resized to 64x32x64 (LNCC over them and their 2x pooled copies, the augmentation's 3 voxels of the
    # 128 grid = 1.5 of this one), lambda 1 -> 4, a constant rate after 100 warm-up steps: half the cost of a
    # full-resolution step, and the first ~1,000 steps of learning do not need the fine images. The main stage then
    # starts from its weights (init_weights) at lambda 4 with 50 warm-up steps (Adam's moments start anew). The split
    # 1,200 + 800 steps was chosen on the validation pairs.
    FULL="[128,64,128]"; EPOCHS=${EPOCHS_FINE:-16}; FINAL=stage1; TARGET=4; BATCH=2; WARM_RUN=${WARM_EPOCHS:-24}
    AUGMENT=(--augment_deform 3.0 --augment_gamma 1.25)
    SHARED=(--regularizer_size "[64,32,64]" --architecture#resample_coarse true --similarity lncc --lncc_kernel 5
            --regularizer gradicon --cpu_amp auto --ic_point_fraction 0.25)
    RECIPE_EXTRA=("${SHARED[@]}" --image_size "[128,64,128]" --coarse_factor 2 --similarity_scales "[1,2,4]"
                  --val_interval 4)
    WARM=("${SHARED[@]}" --image_size "[64,32,64]" --coarse_factor 1 --similarity_scales "[1,2]" --augment_deform 1.5
          --augment_gamma 1.25)
  elif [ "$VARIANT" = twostage ]; then
    FULL="[64,32,64]"  # the knees' grid in the T1 head's reoriented (RAS) axis order
  else
    echo "unknown VARIANT=$VARIANT (DATA=real: fine, twostage or augmented)" >&2; exit 2
  fi
else
  OUT=${OUT:-runs/knee3d_demo}
  [ -f "$OUT/datalist.json" ] || {
    "$PY" -m monai_icon synthetic-knees "$OUT/knees" --subjects 16 --shape 64,64,32 --spacing 2.1,2.1,3.75
    "$PY" -m monai_icon datalist "$OUT/knees" --output "$OUT/datalist.json" --test-pairs 8 --test-fraction 0.25 \
      --val-fraction 0.2 --val-pairs 6
  }
  DATA_ARGS=()
fi
STAGE1_EPOCHS=${STAGE1_EPOCHS:-$EPOCHS}; LMBDA=${LMBDA:-$TARGET}  # stage-1 epochs and final lambda, overridable
ARGS=(--datalist "$OUT/datalist.json" --output_root "$OUT" --full_size "$FULL" --batch_size "$BATCH"
      --iterations_per_epoch 50 "${DATA_ARGS[@]}"
      --architecture#encoder_channels "[16,32,64,64,64]" --architecture#decoder_channels "[64,64,32,16,16]")
# The recipe chosen on the T1 head's validation pairs (docs/results.md): U-Nets of 1.4 M parameters each instead of
# the paper's 17 M (twice the steps per minute, the same Dice), Adam 5e-4 with 100 warm-up steps and cosine decay,
# gradients clipped at norm 5, lambda continuation 1 -> 32 over the first half; stage 1 for 1,500 steps.
LR=${LR:-0.0005}; LR_FINE=${LR_FINE:-$LR}  # the peak learning rate (of the main stage after a warm-up stage)
RECIPE=(--val_pairs 6 --max_grad_norm 5)
CONTINUATION=(--lmbda_schedule continuation --lmbda_start "$START" --lmbda_target "$LMBDA" --lmbda_ramp 0.5)
SCHEDULE=(--learning_rate "$LR" --lr_schedule cosine --warmup_steps 100 "${CONTINUATION[@]}")
C=bundle/knee3d_icon/configs
if [ "$WARM_RUN" -gt 0 ]; then
  # the warm-up stage (runs/.../warm; validated once, at its end, on its own half-resolution grid)
  "$PY" -m monai.bundle run --config_file "['$C/common.yaml','$C/stage1.yaml']" --stage warm --epochs "$WARM_RUN" \
    "${ARGS[@]}" "${RECIPE[@]}" --learning_rate "$LR" --lr_schedule constant --warmup_steps 100 "${CONTINUATION[@]}" \
    --val_interval "$WARM_RUN" "${WARM[@]}" "$@"
  SCHEDULE=(--learning_rate "$LR_FINE" --lr_schedule cosine --warmup_steps 50 --lmbda_schedule fixed --lmbda "$LMBDA"
            --init_weights "$OUT/warm/models/model.pt")
fi
"$PY" -m monai.bundle run --config_file "['$C/common.yaml','$C/stage1.yaml']" --epochs "$STAGE1_EPOCHS" "${ARGS[@]}" \
  "${RECIPE[@]}" "${SCHEDULE[@]}" "${AUGMENT[@]}" "${RECIPE_EXTRA[@]}" "$@"
if [ "$FINAL" = stage2 ]; then
  "$PY" -m monai.bundle run --config_file "['$C/common.yaml','$C/stage2.yaml']" --epochs 2 "${ARGS[@]}" \
    --val_pairs 6 --learning_rate 0.0002 "$@"
fi
"$PY" -m monai.bundle run --config_file "['$C/common.yaml','$C/$FINAL.yaml','$C/evaluate.yaml']" "${ARGS[@]}" \
  "${RECIPE_EXTRA[@]}" "$@"  # all test pairs
if [ "$DATA" = real ]; then
  # the network alone on the test pairs' files, as a test-time ensemble (its map averaged with the inverse of its
  # map in the other direction, and both on the images mirrored left-right), applied twice (chosen on the
  # validation pairs)
  "$PY" -m monai_icon register-pairs --datalist "$OUT/datalist.json" --key test_pairs \
    --model "$OUT/$FINAL/models/registration_model.pt" --output-dir "$OUT/register_pairs_network" \
    --symmetric --flip-axes 0 --passes 2
fi
# the test pairs registered as files, as a user would, with coarse-to-fine residual instance optimisation
# (LNCC + GradICON, residual fields on 4 grids; chosen on the validation pairs): label Dice on each fixed image's
# own grid before/after, folds and seconds per pair (runs/.../register_pairs/summary.json). On the T1 head (files of
# 128x128x62 voxels, 128x62x128 in RAS) the images are compared at full resolution (128x64x128) in the last 18 of 36
# steps while the residual fields stay on the 64x32x64 network grid (docs/results.md); the synthetic knees are
# written on the network grid, so their refinement stays there (50 steps).
IO=(--io-steps 50 --io-mode residual --io-levels 4 --io-lr 0.003 --similarity lncc --regularizer gradicon --lmbda 4)
if [ "$DATA" = real ]; then
  IO=(--io-steps 36 --io-fine-steps 18 --io-size 128,64,128 --io-field-size 64,32,64 --io-mode residual
      --io-levels 4 --io-lr 0.003 --similarity lncc --lncc-kernel 5 --regularizer gradicon --lmbda 4)
fi
"$PY" -m monai_icon register-pairs --datalist "$OUT/datalist.json" --key test_pairs \
  --model "$OUT/$FINAL/models/registration_model.pt" --output-dir "$OUT/register_pairs" "${IO[@]}"
# register one test pair of files with the exported model; outputs on the fixed image's own grid
PAIR=$("$PY" -c "
import json, os; p = json.load(open('$OUT/datalist.json'))['test_pairs'][0]
print(' '.join(os.path.join('$OUT', p[k]) for k in ('fixed_image', 'moving_image', 'moving_label')))")
read -r FIXED MOVING LABEL <<< "$PAIR"
"$PY" -m monai_icon register --fixed "$FIXED" --moving "$MOVING" --model "$OUT/$FINAL/models/registration_model.pt" \
  --warped "$OUT/register/warped.nii.gz" --ddf "$OUT/register/ddf.nii.gz" --transform "$OUT/register/phi.h5" \
  --moving-label "$LABEL" --warped-label "$OUT/register/warped_label.nii.gz"
