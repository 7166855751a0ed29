#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Prepare the knee atlas-segmentation bundle (bundle/knee_atlas_segmentation).

    python scripts/make_knee_atlas_bundle.py --atlas                   # (re)write the shipped synthetic atlas
    python scripts/make_knee_atlas_bundle.py --model runs/knee3d_demo/stage2/models/registration_model.pt

``--model`` takes a trained 3D knee model (``bundle/knee3d_icon`` stage 2, exported as ``registration_model.pt``) whose
network matches the bundle's ``architecture`` (``configs/inference.json``: the one ``scripts/run_knee3d_demo.sh``
trains) and writes its weights as ``models/model.pt`` (what MONAI Label and ``python -m monai.bundle run`` load), in
float16 by default (half the size; loaded into the float32 network, the same labels up to rounding; ``--no-half``
keeps float32). ``--identity`` writes untrained (identity-map) weights instead, which only exercise the plumbing.
"""

from __future__ import annotations

import argparse
import inspect
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


def bundle_settings(bundle: Path) -> dict:
    """The bundle's ``inference.json`` as plain data (its ``architecture``, ``spatial_size``, ``axcodes``, ...)."""
    return json.loads((bundle / "configs" / "inference.json").read_text())


def bundle_architecture(bundle: Path) -> dict:
    return dict(bundle_settings(bundle)["architecture"])


def bundle_network(bundle: Path, architecture: dict | None = None) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    if architecture is not None:
        parser["architecture"] = architecture
    return parser.get_parsed_content("network_def")


def check_architecture(network_def: dict, architecture: dict) -> None:
    """Raise ``ValueError`` unless the model file's network spec builds the bundle's network: every setting of
    ``monai_icon.networks.multistep_registration`` but ``freeze_coarse`` (training only) equal, defaults included."""
    from monai_icon.networks import multistep_registration

    target = network_def.get("_target_", "")
    if not target.endswith("multistep_registration"):
        raise ValueError(f"the model's network is {target!r}; the bundle runs multistep_registration.")
    defaults = {k: p.default for k, p in inspect.signature(multistep_registration).parameters.items()}
    differ = {}
    for key in sorted(set(defaults) - {"freeze_coarse", "coarse_weights"}):
        model, wanted = network_def.get(key, defaults[key]), architecture.get(key, defaults[key])
        if isinstance(model, (list, tuple)) or isinstance(wanted, (list, tuple)):
            model, wanted = list(model), list(wanted)
        if model != wanted:
            differ[key] = (model, wanted)
    if differ:
        lines = "; ".join(f"{k}: model {m}, bundle {w}" for k, (m, w) in differ.items())
        raise ValueError(f"the model's network differs from the bundle's architecture ({lines}); train with the "
                         "bundle's architecture or pass --architecture.")


def write_weights(
    bundle: Path, state: dict[str, torch.Tensor] | None, architecture: dict | None = None, half: bool = False
) -> Path:
    """``models/model.pt`` of the bundle (written atomically): the registration network's weights under
    ``network.``, floating-point tensors in float16 with ``half`` (MONAI's ``CheckpointLoader`` copies them into
    the float32 network)."""
    network = bundle_network(bundle, architecture)
    if state is not None:
        network.network.load_state_dict(state, strict=True)
    weights = {
        k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous()
        for k, v in network.state_dict().items()
    }
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise ValueError("the weights hold NaN or infinite values" + (" (in float16)" if half else "") + ".")
    (bundle / "models").mkdir(exist_ok=True)
    path = bundle / "models" / "model.pt"
    tmp = path.with_name("model.pt.partial")
    torch.save(weights, tmp)
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--atlas", action="store_true", help="write the synthetic atlas image and labels")
    parser.add_argument("--model", type=Path, help="a trained registration_model.pt (bundle/knee3d_icon stage 2)")
    parser.add_argument("--identity", action="store_true", help="write untrained (identity) weights")
    parser.add_argument("--architecture", type=json.loads, help="override the bundle's architecture (JSON)")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                        help="store the weights in float16 (default; --no-half: float32)")
    args = parser.parse_args()
    if args.atlas:
        write_atlas(args.bundle)
        print(f"atlas written to {args.bundle / 'atlas'}")
    if args.model is not None:
        from monai_icon.apps import load_registration_model

        content = torch.load(args.model, map_location="cpu", weights_only=True)
        architecture = args.architecture or bundle_architecture(args.bundle)
        try:
            check_architecture(content.get("network_def", {}) if isinstance(content, dict) else {}, architecture)
        except ValueError as error:
            raise SystemExit(f"{args.model}: {error}") from None
        model = load_registration_model(args.model, channels_last=False)
        settings = bundle_settings(args.bundle)
        if tuple(model.spatial_size) != tuple(settings["spatial_size"]) or model.axcodes != settings["axcodes"]:
            raise SystemExit(f"the model runs on {model.spatial_size} in {model.axcodes} order, the bundle on "
                             f"{settings['spatial_size']} in {settings['axcodes']} order (configs/inference.json).")
        path = write_weights(args.bundle, model.network.state_dict(), args.architecture, args.half)
        print(f"weights written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    elif args.identity:
        print(f"identity weights written to {write_weights(args.bundle, None, args.architecture, args.half)}")


if __name__ == "__main__":
    main()
