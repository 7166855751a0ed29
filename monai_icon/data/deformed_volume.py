# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""A labelled 3D population from one real volume: randomly deformed copies of an image and its label map.

No package registry ships several labelled 3D subjects; this turns one (by default the embedded ITK T1 head
volume with its 6-class k-means segmentation, see ``resources/README.md``) into a population whose pairwise
registrations have a known label answer, so the 3D pipeline is exercised on real MR contrast.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

__all__ = ["embedded_t1_head", "random_smooth_ddf", "write_deformed_copies"]


def embedded_t1_head() -> tuple[Path, Path]:
    """Paths of the embedded T1 head volume and its k-means label map (labels 0-6)."""
    root = Path(str(resources.files("monai_icon.data.resources")))
    return root / "itk_t1_head.nii.gz", root / "itk_t1_head_kmeans6.nii.gz"


def random_smooth_ddf(shape: tuple[int, ...], spacing: np.ndarray, magnitude_mm: float, generator: torch.Generator,
                      control_points: int = 5) -> torch.Tensor:
    """A smooth random MONAI voxel DDF ``[3, *shape]``: control-point displacements with a standard deviation of
    ``magnitude_mm`` millimetres (per axis, converted to voxels with ``spacing``), trilinearly upsampled."""
    coarse = torch.randn(1, 3, *([control_points] * 3), generator=generator, dtype=torch.float64) * magnitude_mm
    coarse = coarse / torch.as_tensor(spacing, dtype=torch.float64).reshape(1, 3, 1, 1, 1)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0].float()


def write_deformed_copies(
    folder: str | Path,
    num_copies: int = 8,
    image: str | Path | None = None,
    label: str | Path | None = None,
    deformation_mm: float = 6.0,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Write ``num_copies`` deformed copies of ``image``/``label`` (defaults: :func:`embedded_t1_head`) as
    ``<9100000 + i>_image.nii.gz`` / ``..._label.nii.gz`` (one "subject" each, original affine), with a random
    smooth deformation (``deformation_mm``) and a random intensity gamma (0.8-1.25) per copy; labels are warped
    with nearest-neighbour interpolation. Build a datalist with
    ``build_knee_datalist(folder, require_side=False)``.

    Returns:
        one ``{"image", "label", "subject"}`` record per copy.
    """
    import nibabel as nib

    if num_copies < 1:
        raise ValueError(f"num_copies must be >= 1, got {num_copies}.")
    default_image, default_label = embedded_t1_head()
    image_path, label_path = Path(image or default_image), Path(label or default_label)
    src, seg = _load_volume(image_path), _load_volume(label_path)
    if src.shape[:3] != seg.shape[:3] or len(src.shape) != 3:
        raise ValueError(f"need a 3D image and a label map of the same shape, got {src.shape} and {seg.shape}.")
    data = torch.as_tensor(np.asarray(src.dataobj, dtype=np.float32))
    labels = torch.as_tensor(np.asarray(seg.dataobj).astype(np.float32))
    low, high = float(data.min()), float(data.max())
    spacing = np.asarray(src.header.get_zooms()[:3], dtype=np.float64)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    linear, nearest = Warp("bilinear", "border"), Warp("nearest", "border")
    records = []
    for i in range(num_copies):
        ddf = random_smooth_ddf(tuple(data.shape), spacing, deformation_mm, generator)[None]
        warped = linear(data[None, None], ddf)[0, 0]
        gamma = float(torch.empty(()).uniform_(np.log(0.8), np.log(1.25), generator=generator).exp())
        warped = low + (high - low) * ((warped - low) / max(high - low, 1e-6)).clamp(0, 1) ** gamma
        warped_labels = nearest(labels[None, None], ddf)[0, 0].round().to(torch.uint8)
        subject = f"{9100000 + i}"
        paths = {"image": str(folder / f"{subject}_image.nii.gz"), "label": str(folder / f"{subject}_label.nii.gz")}
        for key, array in (("image", warped.numpy()), ("label", warped_labels.numpy())):
            tmp = Path(paths[key] + ".partial.nii.gz")
            nib.save(nib.Nifti1Image(array, src.affine), str(tmp))
            tmp.replace(paths[key])
        records.append({**paths, "subject": subject})
    (folder / "subjects.json").write_text(json.dumps(records, indent=1))
    return records


def _load_volume(path: Path) -> SpatialImage:
    """The image volume in ``path`` (read lazily by nibabel), with clear errors for a missing or non-image file."""
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"volume not found: {path}")
    volume = nib.load(str(path))
    if not isinstance(volume, nib.spatialimages.SpatialImage):
        raise ValueError(f"{path} is not an image volume (nibabel read it as {type(volume).__name__}).")
    return volume
