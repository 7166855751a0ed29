#!/usr/bin/env bash
# Train the 3D brain registration model meant for images it has never seen (bundle/knee3d_icon,
# models/brain_transfer_model.pt): the T1-head network (two U-Net steps on 64x32x64, the loss on 128x64x128 images in
# RAS order) fine-tuned from the shipped T1-head model on deformed copies of the embedded ITK T1 head, with
#   - images synthesised from the label maps (random intensity per label, noise, blur; SynthMorph-style), half of
#     the pairs, a fifth of them on random-shapes label maps; labels dropped to zero intensity (as after skull
#     stripping) with probability 0.1 each; a random bias field on every image;
#   - deformations at three spatial scales (4, 6 and 10 control points per axis) with random magnitudes, random
#     rotations (+-8 degrees), scalings (+-8 %), shifts (+-4 voxels) and intensity gammas, per image.
# Everything goes to $OUT (default runs/transfer3d); a rerun resumes from the last checkpoint. EPOCHS (of 50 steps,
# batch 2) sets the length, VAL_INTERVAL the epochs between validations on the training subject's pairs; further
# arguments override bundle keys (e.g. --synthesis_prob 0 to leave out the synthesis). Evaluate with
# benchmarks/generalisation3d.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
OUT=${OUT:-runs/transfer3d}
EPOCHS=${EPOCHS:-60}
INIT=${INIT:-bundle/knee3d_icon/models/t1head_registration_model.pt}
[ -f "$OUT/datalist.json" ] || "$PY" -c "
from monai_icon.data import build_knee_datalist, write_datalist, write_deformed_copies
write_deformed_copies('$OUT/volumes', num_copies=16, deformation_mm=6.0, seed=0)
write_datalist(build_knee_datalist('$OUT/volumes', 0.25, 8, require_side=False, relative_to='$OUT', val_fraction=0.2, num_val_pairs=6), '$OUT/datalist.json')"
C=bundle/knee3d_icon/configs
"$PY" -m monai.bundle run --config_file "['$C/common.yaml','$C/stage1.yaml']" \
  --datalist "$OUT/datalist.json" --output_root "$OUT" --full_size "[128,64,128]" --image_size "[128,64,128]" \
  --target_side '$None' --axcodes RAS --num_classes 7 \
  --label_names "{1: 'class1', 2: 'class2', 3: 'class3', 4: 'class4', 5: 'class5', 6: 'class6'}" \
  --architecture#encoder_channels "[16,32,64,64,64]" --architecture#decoder_channels "[64,64,32,16,16]" \
  --architecture#resample_coarse true --coarse_factor 2 --init_weights "$INIT" \
  --batch_size 2 --iterations_per_epoch 50 --epochs "$EPOCHS" --val_pairs 6 --val_interval "${VAL_INTERVAL:-10}" \
  --similarity lncc --lncc_kernel 5 --similarity_scales "[1,2,4]" --regularizer gradicon \
  --regularizer_size "[64,32,64]" --ic_point_fraction 0.25 --cpu_amp auto --max_grad_norm 5 \
  --lmbda_schedule fixed --lmbda 4 --learning_rate 0.0002 --lr_schedule cosine --warmup_steps 50 \
  --augment_rotate 8 --augment_scale 0.08 --augment_translate 4 --augment_deform 3.0 \
  --augment_deform_points "[4,6,10]" --augment_deform_random true --augment_gamma 1.5 \
  --synthesis_prob 0.5 --synthesis_shapes 0.1 --synthesis_drop 0.1 --synthesis_bias 0.3 "$@"
# the exported model with float16 weights (half the size, the same registrations up to rounding): what the bundle ships
"$PY" - "$OUT/stage1/models/registration_model.pt" "$OUT/brain_transfer_model.pt" <<'PY'
import sys
from pathlib import Path

import torch

source, target = sys.argv[1], Path(sys.argv[2])
content = torch.load(source, map_location="cpu", weights_only=True)
content["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in content["state_dict"].items()}
partial = target.with_name(target.name + ".partial")
torch.save(content, partial)
partial.replace(target)
print(f"wrote {target}")
PY
