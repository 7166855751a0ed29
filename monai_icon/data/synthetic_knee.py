# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Synthetic knee-like volumes with cartilage labels, for testing the 3D (OAI-style) path without OAI data.

A knee is an analytic phantom defined in **world coordinates (RAS+, millimetres)**: a femoral shaft ending
in two condyles (the medial one larger), a tibial plateau, a patella, a fibula on the lateral side and a
soft-tissue cylinder around them, with 1-2 voxel-thick cartilage shells: femoral cartilage on the distal
half of the condyles and tibial cartilage on top of the plateau. A ``"RIGHT"`` knee is the mirror image of a
``"LEFT"`` one in the left-right (``x``) world axis (the fibula and the larger condyle swap sides). Each
subject gets random sizes, intensities and a random smooth deformation.

Because the phantom lives in world space it can be sampled on any grid (any spacing, orientation, size),
which the tests use to check spacing/orientation handling with known answers.

Labels: 0 background, 1 femoral cartilage, 2 tibial cartilage (:data:`KNEE_LABELS`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "KNEE_LABELS",
    "KneeAnatomy",
    "random_knee_anatomy",
    "knee_affine",
    "render_knee",
    "write_synthetic_knees",
]

KNEE_LABELS = {"background": 0, "femoral_cartilage": 1, "tibial_cartilage": 2}

_SIDES = ("LEFT", "RIGHT")


@dataclass
class KneeAnatomy:
    """Sizes (mm), intensities and a smooth deformation of one synthetic knee (see the module docstring).

    ``deformation`` is a ``[3, 5, 5, 5]`` displacement (mm, RAS) on a control grid spanning ``±extent`` mm
    that is interpolated (trilinear) at every world point before the shapes are evaluated.
    """

    side: str = "LEFT"
    condyle_radius: float = 16.0  # medial condyle; the lateral one is 0.85 times this
    condyle_spacing: float = 13.0  # half the distance between the condyle centres (x)
    shaft_radius: float = 12.0
    plateau_radii: tuple[float, float] = (32.0, 24.0)  # x, y
    joint_gap: float = 10.0  # between condyle bottom and plateau top (holds both cartilage layers)
    cartilage: float = 4.5  # thickness (thicker than real cartilage, so that it survives coarse CPU grids)
    fibula_radius: float = 6.0
    patella_radii: tuple[float, float, float] = (12.0, 5.0, 14.0)
    extent: float = 60.0
    intensities: tuple[float, float, float, float] = (0.25, 0.55, 0.9, 0.4)  # soft tissue, bone, cartilage, fat
    noise: float = 0.02
    # position of the knee in the field of view (mm; x mirrored for RIGHT)
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    deformation: np.ndarray | None = None

    def __post_init__(self) -> None:
        side = str(self.side).upper()
        if side not in _SIDES:
            raise ValueError(f"side must be 'LEFT' or 'RIGHT', got {self.side!r}.")
        self.side = side


def random_knee_anatomy(
    side: str = "LEFT", seed: int | None = None, deformation_mm: float = 5.0, offset_mm: float = 6.0
) -> KneeAnatomy:
    """A knee with sizes jittered by about ±10 %, jittered intensities, a random position (uniform in
    ``±offset_mm`` per axis) and a random smooth deformation whose control-point displacements have a standard
    deviation of ``deformation_mm`` (0 for none)."""
    rng = np.random.default_rng(seed)

    def jitter(value: float, rel: float = 0.1) -> float:
        return float(value * (1.0 + rel * rng.uniform(-1.0, 1.0)))

    base = KneeAnatomy(side=side)
    deformation = rng.normal(0.0, deformation_mm, size=(3, 5, 5, 5)).astype(np.float32) if deformation_mm > 0 else None
    return KneeAnatomy(
        side=side,
        condyle_radius=jitter(base.condyle_radius),
        condyle_spacing=jitter(base.condyle_spacing),
        shaft_radius=jitter(base.shaft_radius),
        plateau_radii=(jitter(base.plateau_radii[0]), jitter(base.plateau_radii[1])),
        joint_gap=jitter(base.joint_gap),
        cartilage=jitter(base.cartilage),
        fibula_radius=jitter(base.fibula_radius),
        patella_radii=tuple(jitter(r) for r in base.patella_radii),  # type: ignore[arg-type]
        intensities=tuple(  # type: ignore[arg-type]
            float(np.clip(v + rng.uniform(-0.05, 0.05), 0.0, 1.0)) for v in base.intensities
        ),
        offset=tuple(float(v) for v in rng.uniform(-offset_mm, offset_mm, size=3)),  # type: ignore[arg-type]
        deformation=deformation,
    )


def knee_affine(
    shape: Sequence[int],
    spacing: Sequence[float],
    axcodes: str = "PIR",
    rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A voxel-to-world (RAS+, mm) affine of a grid centred on the knee.

    Args:
        shape: grid size per array axis.
        spacing: voxel size per array axis (mm).
        axcodes: direction each array axis increases towards (NIfTI/MONAI letters, e.g. ``"PIR"``: axis 0
            towards posterior, axis 1 towards inferior, axis 2 towards the right; a sagittal acquisition
            with the slices along left-right like OAI's DESS).
        rotation_deg: extra rotation about the world x, y, z axes (degrees) for oblique grids.

    Returns:
        ``[4, 4]`` float64 affine; the grid's centre maps to the world origin.
    """
    if len(shape) != 3 or len(spacing) != 3 or len(axcodes) != 3:
        raise ValueError(f"shape, spacing and axcodes need 3 entries, got {shape}, {spacing}, {axcodes!r}.")
    letters = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    axes = np.zeros((3, 3))
    for j, code in enumerate(axcodes.upper()):
        if code not in letters:
            raise ValueError(f"unknown orientation letter {code!r} in {axcodes!r} (use R/L, A/P, S/I).")
        row, sign = letters[code]
        axes[row, j] = sign
    if sorted(np.abs(axes).argmax(0)) != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} must name each of the three world axes once.")
    rx, ry, rz = np.deg2rad(np.asarray(rotation_deg, dtype=float))
    rot_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    rot_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    rot_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    linear = rot_z @ rot_y @ rot_x @ axes @ np.diag(np.asarray(spacing, dtype=float))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.asarray(shape, dtype=float) - 1.0) / 2.0)
    return affine


def _world_points(shape: Sequence[int], affine: np.ndarray) -> torch.Tensor:
    """World coordinates ``[3, *shape]`` (float64) of the voxel centres."""
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    aff = torch.as_tensor(affine, dtype=torch.float64)
    return torch.einsum("ij,j...->i...", aff[:3, :3], index) + aff[:3, 3].reshape(3, 1, 1, 1)


def _deform(points: torch.Tensor, anatomy: KneeAnatomy) -> torch.Tensor:
    if anatomy.deformation is None:
        return points
    field = torch.as_tensor(anatomy.deformation, dtype=torch.float64).unsqueeze(0)  # [1, 3, 5, 5, 5] over x, y, z
    # grid_sample's last grid coordinate indexes the first field axis (x): pass (z, y, x) in [-1, 1]
    grid = (points / anatomy.extent).flip(0).movedim(0, -1).unsqueeze(0)
    disp = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
    return points + disp


def render_knee(
    anatomy: KneeAnatomy, shape: Sequence[int], affine: np.ndarray, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample a knee on a voxel grid.

    Args:
        anatomy: the knee (see :func:`random_knee_anatomy`).
        shape: grid size ``(N0, N1, N2)``.
        affine: voxel-to-world (RAS+, mm) affine of the grid, e.g. from :func:`knee_affine`.
        seed: seed of the image noise.

    Returns:
        ``(image, label)``: float32 image in about ``[0, 1]`` and uint8 labels (:data:`KNEE_LABELS`), both of
        ``shape``.
    """
    p = _deform(_world_points(shape, affine), anatomy)
    ox, oy, oz = anatomy.offset
    x, y, z = p[0] * (1.0 if anatomy.side == "LEFT" else -1.0) - ox, p[1] - oy, p[2] - oz  # a right knee mirrors x
    # a left knee's lateral side is the patient's left (-x): lateral condyle and fibula there
    r_med, r_lat = anatomy.condyle_radius, 0.85 * anatomy.condyle_radius
    c = anatomy.condyle_spacing
    cz = 0.5 * anatomy.joint_gap + r_med  # condyle centres; their bottoms (medial) at z = +gap/2
    d_med = torch.sqrt((x - c) ** 2 + y**2 + (z - cz) ** 2)
    d_lat = torch.sqrt((x + c) ** 2 + y**2 + (z - (cz - r_med + r_lat)) ** 2)
    shaft = (torch.sqrt(x**2 + (y + 2.0) ** 2) < anatomy.shaft_radius) & (z > cz)
    femur = (d_med < r_med) | (d_lat < r_lat) | shaft
    t = anatomy.cartilage
    below = z < cz
    fem_cart = ~femur & below & (((d_med >= r_med) & (d_med < r_med + t)) | ((d_lat >= r_lat) & (d_lat < r_lat + t)))
    top = -0.5 * anatomy.joint_gap
    ax, ay = anatomy.plateau_radii
    ellipse = (x / ax) ** 2 + (y / ay) ** 2
    tibia = (ellipse < 1.0) & (z < top) & (z > top - 45.0)
    tib_cart = (ellipse < 0.7) & (z >= top) & (z < top + t) & ~fem_cart & ~femur
    fibula = (torch.sqrt((x + 0.8 * ax) ** 2 + (y + 0.5 * ay) ** 2) < anatomy.fibula_radius) & (z < top - 10.0)
    px, py, pz = anatomy.patella_radii
    patella = ((x / px) ** 2 + ((y - r_med - py - 4.0) / py) ** 2 + ((z - cz - 6.0) / pz) ** 2) < 1.0
    leg = torch.sqrt((x / 55.0) ** 2 + (y / 48.0) ** 2) < 1.0
    fat = leg & ~(torch.sqrt((x / 48.0) ** 2 + (y / 41.0) ** 2) < 1.0)

    soft, bone, cart, fat_value = anatomy.intensities
    image = torch.zeros(p.shape[1:], dtype=torch.float64)
    image[leg] = soft
    image[fat] = fat_value
    image[femur | tibia | fibula | patella] = bone
    image[fem_cart | tib_cart] = cart
    # marrow texture: a smooth ripple in (mirrored) world space, so it deforms and mirrors with the anatomy
    image = image + 0.04 * (femur | tibia).double() * torch.sin(x / 3.0) * torch.cos(z / 4.0)
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    image = image + anatomy.noise * torch.randn(image.shape, generator=generator, dtype=torch.float64) * leg.double()
    label = torch.zeros(p.shape[1:], dtype=torch.uint8)
    label[fem_cart] = KNEE_LABELS["femoral_cartilage"]
    label[tib_cart] = KNEE_LABELS["tibial_cartilage"]
    return image.float().numpy(), label.numpy()


def write_synthetic_knees(
    folder: str | Path,
    num_subjects: int = 8,
    shape: Sequence[int] = (96, 96, 40),
    spacing: Sequence[float] = (1.4, 1.4, 3.0),
    axcodes: str = "PIR",
    deformation_mm: float = 5.0,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Write an OAI-like folder of synthetic knees: ``<subject>_<YYYYMMDD>_SAG_3D_DESS_<SIDE>_image.nii.gz``
    and the matching ``..._label.nii.gz``, sides alternating LEFT/RIGHT, plus ``subjects.json``.

    Args:
        folder: output folder (created).
        num_subjects: number of knees (one per subject id ``9000000 + i``).
        shape, spacing, axcodes: the grid of every file (see :func:`knee_affine`); the defaults are a quarter
            of OAI's 384x384x160 DESS grid at 0.365x0.365x0.7 mm, approximately.
        deformation_mm: strength of each subject's random deformation.
        seed: base seed (subject ``i`` uses ``seed + i``).

    Returns:
        one ``{"image", "label", "side", "subject"}`` record per knee (absolute paths).
    """
    import nibabel as nib  # monai[nibabel]

    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine = knee_affine(shape, spacing, axcodes)
    records = []
    for i in range(num_subjects):
        side = _SIDES[i % 2]
        subject = f"{9000000 + i}"
        anatomy = random_knee_anatomy(side, seed=seed + i, deformation_mm=deformation_mm)
        image, label = render_knee(anatomy, shape, affine, seed=seed + i)
        stem = folder / f"{subject}_20040101_SAG_3D_DESS_{side}"
        paths = {"image": f"{stem}_image.nii.gz", "label": f"{stem}_label.nii.gz"}
        for key, array in (("image", image), ("label", label)):
            tmp = Path(paths[key] + ".partial.nii.gz")
            nib.save(nib.Nifti1Image(array, affine), str(tmp))
            tmp.replace(paths[key])  # never leave a half-written file under the final name
        records.append({**paths, "side": side, "subject": subject})
    (folder / "subjects.json").write_text(json.dumps(records, indent=1))
    return records
