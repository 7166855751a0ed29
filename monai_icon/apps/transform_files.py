# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Using a written transform: apply it to other images or label maps (``monai-icon warp``) and measure its
Jacobian determinant in physical space (``monai-icon jacobian``).

Transforms are the files ``monai-icon register`` writes: an ITK ``DisplacementFieldTransform`` (``.h5``) or the
displacement field image (LPS millimetres on the fixed grid: fixed voxel centre ``y`` maps to moving point
``y + d(y)``, the ITK/ANTs convention). Both are read into a RAS-millimetre displacement on the field's grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from monai_icon.apps.physical import label_dtype, load_image, sample_labels, sample_world, world_points, write_image
from monai_icon.apps.validation import (
    IMAGE_SUFFIXES,
    TRANSFORM_SUFFIXES,
    check_label_values,
    check_nifti_header,
    check_output_path,
    check_outputs_spare_inputs,
)
from monai_icon.metrics.folds import jacobian_determinant

__all__ = ["WARP_MODES", "read_displacement", "warp_file", "jacobian_file"]

WARP_MODES = ("linear", "nearest", "label")
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _from_itk(image) -> tuple[torch.Tensor, np.ndarray]:
    """An ITK vector image as ``[3, *N]`` (MONAI array order, LPS values as stored) and its RAS affine."""
    import itk

    array = np.asarray(itk.array_from_image(image), dtype=np.float64)  # [z, y, x, 3]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected a 3D field of 3-vectors, got an array of shape {array.shape}.")
    values = torch.from_numpy(np.ascontiguousarray(array.transpose(3, 2, 1, 0)))
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    return values, _LPS @ affine


def _check_nifti_field(path: Path) -> None:
    """A NIfTI displacement field's header and values as stored (ITK's NIfTI reader turns NaN into 0)."""
    import nibabel as nib

    check_nifti_header(path, "transform")
    values = np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise ValueError(f"the transform {path} holds {int((~np.isfinite(values)).sum())} NaN or infinite "
                         "displacement value(s); it cannot be applied or measured.")


def read_displacement(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """Read a transform written by ``monai-icon register``.

    Returns:
        ``(displacement, affine)``: ``[3, *N]`` float64 displacement in **RAS** millimetres on the field's grid,
        and that grid's voxel-to-world (RAS) affine.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a 3D displacement field / displacement-field transform, or non-finite values.
    """
    import itk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transform not found: {path}")
    try:
        if path.name.lower().endswith(TRANSFORM_SUFFIXES):
            transforms = itk.transformread(str(path))
            fields = [t for t in transforms if t.GetNameOfClass() == "DisplacementFieldTransform"]
            if len(transforms) != 1 or not fields:
                raise ValueError(f"{path} must hold one DisplacementFieldTransform, got "
                                 f"{[t.GetNameOfClass() for t in transforms]}.")
            field = fields[0].GetDisplacementField()
        else:
            if path.name.lower().endswith((".nii", ".nii.gz")):
                _check_nifti_field(path)
            field = itk.imread(str(path))
            if field.GetImageDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
                raise ValueError(f"{path} is not a 3D displacement field (3 components per voxel): it has "
                                 f"{field.GetNumberOfComponentsPerPixel()} component(s) in "
                                 f"{field.GetImageDimension()}D.")
    except ValueError:
        raise
    except Exception as err:  # ITK raises RuntimeError/TypeError for unreadable or foreign files
        raise ValueError(f"cannot read {path} as a displacement field transform: {err}") from err
    lps, affine = _from_itk(field)
    if not np.isfinite(affine).all():
        raise ValueError(f"the transform {path} has NaN or infinite values in its grid's geometry.")
    if not bool(torch.isfinite(lps).all()):
        raise ValueError(f"the transform {path} holds {int((~torch.isfinite(lps)).sum())} NaN or infinite "
                         "displacement value(s); it cannot be applied or measured.")
    ras = lps.clone()
    ras[:2] = -ras[:2]  # LPS -> RAS components
    return ras, affine


def _moving_points(displacement: torch.Tensor, field_affine: np.ndarray, reference_affine: np.ndarray,
                   reference_shape: tuple[int, ...]) -> torch.Tensor:
    """World points ``[3, *reference_shape]`` the reference voxel centres map to: ``y + d(y)``, the field
    interpolated linearly at ``y`` when the reference grid is not the field's own."""
    y = world_points(reference_affine, reference_shape)
    same_grid = tuple(displacement.shape[1:]) == tuple(reference_shape) and np.allclose(field_affine, reference_affine)
    if same_grid:
        d = displacement
    else:
        d = sample_world(displacement.float(), field_affine, y).double()  # 0 outside the field: identity there
    return y + d


def warp_file(
    moving: str | Path, transform: str | Path, output: str | Path, reference: str | Path | None = None,
    mode: str = "linear",
) -> Path:
    """Resample ``moving`` through ``transform`` onto a reference grid and write it.

    Args:
        moving: image or label map to warp.
        transform: ``.h5`` displacement-field transform or displacement image (see the module docstring).
        output: file to write (checked before any computation).
        reference: image whose grid the output takes (default: the transform's own grid, the fixed image's).
        mode: ``"linear"`` (images), ``"nearest"``, or ``"label"`` (integer labels: one-hot, linear, arg-max).

    Raises:
        FileNotFoundError, ValueError: missing/unreadable files, an unknown mode, a non-integer label map in
            ``"label"`` mode, an output that cannot be written.
    """
    if mode not in WARP_MODES:
        raise ValueError(f"mode must be one of {WARP_MODES}, got {mode!r}.")
    check_output_path(output, "output", IMAGE_SUFFIXES)
    check_outputs_spare_inputs({"output": output}, {"moving image": moving, "transform": transform,
                                                    "reference image": reference})
    displacement, field_affine = read_displacement(transform)
    image = load_image(moving, "moving image")
    if image.ndim != 4:
        raise ValueError(f"warp needs a 3D image, got shape {tuple(image.shape[1:])}.")
    if reference is not None:
        ref = load_image(reference, "reference image")
        ref_affine, ref_shape = np.asarray(ref.affine, dtype=np.float64), tuple(ref.shape[1:])
    else:
        ref_affine, ref_shape = field_affine, tuple(displacement.shape[1:])
    points = _moving_points(displacement, field_affine, ref_affine, ref_shape)
    moving_affine = np.asarray(image.affine, dtype=np.float64)
    if mode == "label":
        check_label_values(image.as_tensor(), f"the label map {moving}")
        out = sample_labels(image.as_tensor()[:1], moving_affine, points)
        array = out.to(label_dtype(out)).numpy()
    else:
        values = sample_world(image.as_tensor(), moving_affine, points, "nearest" if mode == "nearest" else "bilinear")
        array = values[0].numpy() if values.shape[0] == 1 else values.movedim(0, -1).numpy()
    return write_image(array, ref_affine, output)


def jacobian_file(transform: str | Path, output: str | Path | None = None, log: bool = False) -> dict[str, float]:
    """Jacobian determinant of the transform ``y -> y + d(y)`` in physical space, per grid cell.

    The determinant of each cell comes from :func:`~monai_icon.metrics.jacobian_determinant` (the fold metric's
    stencil) applied to the mapped world points, divided by the determinant of the grid's voxel-to-world matrix:
    so its sign is the fold test of ``count_folds`` on the same map, and its value is the local volume change
    (1 = none). Written on the cell centres (the grid shifted by half a voxel, one voxel fewer per axis).

    Args:
        transform: ``.h5`` or displacement image.
        output: optional NIfTI/MHA/NRRD file of the determinant (or its natural log with ``log``; NaN where the
            determinant is not positive).

    Returns:
        ``{"folds": count, "folds_percent": ..., "cells": ..., "min", "max", "mean"}`` of the determinant.
    """
    if output is not None:
        check_output_path(output, "output", IMAGE_SUFFIXES)
        check_outputs_spare_inputs({"output": output}, {"transform": transform})
    displacement, affine = read_displacement(transform)
    shape = tuple(displacement.shape[1:])
    if min(shape) < 2:
        raise ValueError(f"the transform {transform} has a grid of {shape} voxels: the Jacobian needs at least 2 "
                         "voxels along every axis.")
    points = world_points(affine, shape) + displacement
    det = jacobian_determinant(points.unsqueeze(0))[0] / float(np.linalg.det(affine[:3, :3]))
    folds = int((det < 0).sum())
    summary = {"folds": folds, "folds_percent": 100.0 * folds / det.numel(), "cells": int(det.numel()),
               "min": float(det.min()), "max": float(det.max()), "mean": float(det.mean())}
    if output is not None:
        # det[i] belongs to the cell between voxel centres i and i + 1: its centre is at index i + 0.5
        shift = np.eye(4)
        shift[:3, 3] = 0.5
        values = det.log() if log else det  # log of a negative determinant is NaN: a fold
        write_image(values.float().numpy(), affine @ shift, output)
    return summary
