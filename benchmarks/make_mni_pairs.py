#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""A second real brain for generalisation tests: the MNI ICBM152 2009 template shipped inside the nilearn wheel,
resampled to a coarser grid, with its grey / white matter probability maps thresholded at 0.5 as labels 1 / 2,
turned into labelled pairs by seeded smooth deformations (``monai_icon.data.write_deformed_copies``).

Nothing is downloaded by this script and nothing is shipped: bring the wheel (``pip download --no-deps nilearn``).
The template is © McConnell Brain Imaging Centre (Fonov et al., NeuroImage 2011; free use with attribution).

    pip download --no-deps nilearn -d wheels/
    python benchmarks/make_mni_pairs.py --wheel wheels/nilearn-*.whl --out runs/mni152 --copies 6 --pairs 6
    python benchmarks/syn_vs_icon.py --datalist runs/mni152/datalist.json --model MODEL.pt --out runs/mni_vs_syn

Writes ``<out>/mni152_t1.nii.gz`` / ``mni152_gm_wm.nii.gz`` (the resampled template), ``<out>/volumes/`` (the
deformed copies) and ``<out>/datalist.json`` (every copy a test subject; ``test_pairs`` between copies).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMBERS = {
    "t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def read_member(wheel: Path, name: str, work: Path) -> nib.Nifti1Image:
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(MEMBERS[name])
        except KeyError:
            raise FileNotFoundError(f"{wheel} has no {MEMBERS[name]} (a nilearn wheel is needed).") from None
    path = work / Path(MEMBERS[name]).name
    path.write_bytes(data)
    return nib.load(str(path))


def downsample(image: nib.Nifti1Image, factor: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Average-pool (``mode="area"``) by an integer factor; the affine follows (voxel centres of the pooled grid)."""
    data = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))[None, None]
    pooled = torch.nn.functional.avg_pool3d(data, factor, ceil_mode=False)[0, 0].numpy()
    scale = np.diag([factor, factor, factor, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = (factor - 1) / 2.0
    return pooled, image.affine @ shift @ scale


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheel", required=True, help="a nilearn wheel (.whl)")
    p.add_argument("--out", default="runs/mni152")
    p.add_argument("--factor", type=int, default=2, help="average-pooling factor of the 1 mm template (default 2)")
    p.add_argument("--copies", type=int, default=6)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--deformation-mm", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=100)
    args = p.parse_args(argv)
    from monai_icon.data import build_knee_datalist, write_datalist, write_deformed_copies

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wheel = Path(args.wheel)
    if not wheel.is_file():
        raise FileNotFoundError(f"wheel not found: {wheel}")
    t1, gm, wm = (read_member(wheel, k, out) for k in ("t1", "gm", "wm"))
    t1_data, affine = downsample(t1, args.factor, "area")
    gm_data, _ = downsample(gm, args.factor, "area")
    wm_data, _ = downsample(wm, args.factor, "area")
    labels = np.zeros(t1_data.shape, np.uint8)
    labels[gm_data > 0.5] = 1
    labels[wm_data > 0.5] = 2
    image_path, label_path = out / "mni152_t1.nii.gz", out / "mni152_gm_wm.nii.gz"
    nib.save(nib.Nifti1Image(t1_data.astype(np.float32), affine), str(image_path))
    nib.save(nib.Nifti1Image(labels, affine), str(label_path))
    write_deformed_copies(out / "volumes", num_copies=args.copies, image=image_path, label=label_path,
                          deformation_mm=args.deformation_mm, seed=args.seed)
    datalist = build_knee_datalist(out / "volumes", test_fraction=0.99, num_test_pairs=args.pairs,
                                   require_side=False, relative_to=out)
    datalist["labels"] = {"0": "background", "1": "grey_matter", "2": "white_matter"}
    path = write_datalist(datalist, out / "datalist.json")
    print(f"{datalist['description']}; template {t1_data.shape} at {args.factor} mm; written to {path}")
    return path


if __name__ == "__main__":
    main()
