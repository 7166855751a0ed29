#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Prepare the knee atlas-segmentation bundle (bundle/knee_atlas_segmentation).

    python scripts/make_knee_atlas_bundle.py --atlas                   # (re)write the shipped synthetic atlas
    python scripts/make_knee_atlas_bundle.py --model runs/knee3d_demo/stage2/models/registration_model.pt

``--model`` takes a trained 3D knee model (``bundle/knee3d_icon`` stage 2, exported as ``registration_model.pt``) whose
network matches the bundle's ``network_def`` and writes its weights as ``models/model.pt`` (what MONAI Label and
``python -m monai.bundle run`` load); ``--identity`` writes untrained (identity-map) weights instead, which only
exercise the plumbing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from monai.bundle import ConfigParser

BUNDLE = Path(__file__).resolve().parents[1] / "bundle" / "knee_atlas_segmentation"


def write_atlas(bundle: Path) -> None:
    """A LEFT synthetic knee with the mean anatomy (no jitter, no deformation), on the demo's 64x64x32 grid."""
    import nibabel as nib

    from monai_icon.data import KneeAnatomy, knee_affine, render_knee

    anatomy = replace(KneeAnatomy(side="LEFT"), noise=0.0)
    affine = knee_affine((64, 64, 32), (2.1, 2.1, 3.75), "PIR")
    image, label = render_knee(anatomy, (64, 64, 32), affine)
    (bundle / "atlas").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(bundle / "atlas" / "atlas_image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(bundle / "atlas" / "atlas_label.nii.gz"))


def bundle_network(bundle: Path, architecture: dict | None = None) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    if architecture is not None:
        parser["architecture"] = architecture
    return parser.get_parsed_content("network_def")


def write_weights(bundle: Path, state: dict[str, torch.Tensor] | None, architecture: dict | None = None) -> Path:
    """``models/model.pt`` of the bundle: the registration network's weights under ``network.``."""
    network = bundle_network(bundle, architecture)
    if state is not None:
        network.network.load_state_dict(state, strict=True)
    (bundle / "models").mkdir(exist_ok=True)
    path = bundle / "models" / "model.pt"
    tmp = path.with_name("model.pt.partial")
    torch.save(network.state_dict(), tmp)
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--atlas", action="store_true", help="write the synthetic atlas image and labels")
    parser.add_argument("--model", type=Path, help="a trained registration_model.pt (bundle/knee3d_icon stage 2)")
    parser.add_argument("--identity", action="store_true", help="write untrained (identity) weights")
    parser.add_argument("--architecture", type=json.loads, help="override the bundle's architecture (JSON)")
    args = parser.parse_args()
    if args.atlas:
        write_atlas(args.bundle)
        print(f"atlas written to {args.bundle / 'atlas'}")
    if args.model is not None:
        from monai_icon.apps import load_registration_model

        model = load_registration_model(args.model)
        print(f"weights written to {write_weights(args.bundle, model.network.state_dict(), args.architecture)}")
    elif args.identity:
        print(f"identity weights written to {write_weights(args.bundle, None, args.architecture)}")


if __name__ == "__main__":
    main()
