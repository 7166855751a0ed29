# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Registration in physical space: network grids of real image files, world-space transforms, ITK/NIfTI output.

Each image is reoriented, resized to the network's grid and normalised on its own
(:func:`~monai_icon.transforms.to_network_grid`); its MetaTensor affine then maps network voxels to world
millimetres (RAS, MONAI's convention), so ``U = affine @ diag(N - 1, 1)`` maps the network's ``[0, 1]``
coordinates to the world (:func:`unit_to_world`). A map ``phi_AB`` (fixed ``[0, 1]`` -> moving ``[0, 1]``)
becomes the world-space transform ``y -> U_moving(phi_AB(U_fixed^-1(y)))`` from fixed to moving physical points,
the direction of an ITK transform used for resampling. It is evaluated exactly (maps are functions) at every voxel
of the fixed image's own grid, whatever its spacing, orientation and size.

Outside-the-image rule (as ITK's linear interpolator with a default value of 0): a point whose continuous index
lies within half a voxel of the image's voxels gets the (edge-clamped) linear interpolation, others get 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import LoadImage

from monai_icon.apps.atomic_io import atomic_write, is_nifti, run_isolated, write_nifti
from monai_icon.apps.validation import check_nifti_header
from monai_icon.memory import available_memory
from monai_icon.networks.maps import Map, one_hot_labels
from monai_icon.transforms.network_grid import to_network_grid  # noqa: F401  (its home is transforms/)

__all__ = [
    "load_image",
    "to_network_grid",
    "unit_to_world",
    "world_points",
    "fixed_to_moving_world",
    "sample_world",
    "sample_labels",
    "label_dtype",
    "check_memory",
    "write_image",
    "write_displacement",
]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_BITMAP_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CHUNK = 1 << 21  # voxels evaluated at a time (bounds the memory of the world-space steps)


def load_image(path: str | Path, what: str = "image") -> MetaTensor:
    """Load an image file as a channel-first MetaTensor ``[C, *N]`` with its voxel-to-world affine (RAS, mm).

    Raises:
        FileNotFoundError: no such file (``what`` names the role in the message, e.g. "fixed image").
        ValueError: the file cannot be read as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    # 2D bitmaps through ITK, so that their geometry (LPS origin, spacing) is the one ITK tools give them (PIL
    # would give an identity RAS affine: a mirror image of ITK's physical space)
    reader = "ITKReader" if path.suffix.lower() in _BITMAP_SUFFIXES else None
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_header(path, what)  # readers fall back to another affine on a broken sform/qform
    try:
        image = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(str(path))
    except Exception as err:  # readers raise many types for corrupt/unsupported files
        raise ValueError(f"cannot read the {what} {path} as an image: {err}") from err
    if not torch.isfinite(image).all():
        count = int((~torch.isfinite(image)).sum())
        raise ValueError(f"the {what} {path} contains {count} NaN or infinite value(s).")
    image = _square_affine(image)
    if not torch.isfinite(torch.as_tensor(image.affine)).all():
        raise ValueError(f"the {what} {path} has NaN or infinite values in its geometry (origin, spacing or "
                         "direction).")
    return image


def _square_affine(image: MetaTensor) -> MetaTensor:
    """A 2D image's affine as ``3 x 3`` (readers give 2D PNG / NIfTI a ``4 x 4`` one with an unused z row and
    column, MHA a ``3 x 3``): the in-plane part and translation, so 2D geometry is handled like 3D."""
    dims = image.ndim - 1
    affine = image.affine
    if affine.shape[0] == dims + 1:
        return image
    if dims == 2 and affine.shape[0] == 4:
        keep = [0, 1, 3]
        image.affine = affine[keep][:, keep]
        return image
    raise ValueError(f"a {dims}D image with a {tuple(affine.shape)} affine is not supported.")


def unit_to_world(affine: torch.Tensor | np.ndarray, spatial_size: Sequence[int]) -> np.ndarray:
    """``[D+1, D+1]`` matrix taking ``[0, 1]`` network coordinates (corners on voxel centres) to world points,
    given the network grid's voxel-to-world ``affine``."""
    scale = np.diag([max(n - 1, 1) for n in spatial_size] + [1.0])
    return np.asarray(affine, dtype=np.float64) @ scale


def world_points(affine: np.ndarray, shape: Sequence[int], start: int = 0, stop: int | None = None) -> torch.Tensor:
    """World coordinates ``[D, n, *shape[1:]]`` (float64) of voxel centres of slabs ``start:stop`` along axis 0."""
    stop = shape[0] if stop is None else stop
    axes = [torch.arange(start, stop, dtype=torch.float64)] + [torch.arange(n, dtype=torch.float64) for n in shape[1:]]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    aff = torch.as_tensor(affine, dtype=torch.float64)
    dims = len(shape)
    return torch.einsum("ij,j...->i...", aff[:dims, :dims], index) + aff[:dims, dims].reshape(dims, *([1] * dims))


def _slabs(shape: Sequence[int]) -> list[tuple[int, int]]:
    per_slab = int(np.prod(shape[1:]))
    step = max(1, _CHUNK // max(per_slab, 1))
    return [(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def _apply(matrix: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(matrix, dtype=torch.float64, device=points.device)
    dims = points.shape[0]
    return torch.einsum("ij,j...->i...", m[:dims, :dims], points) + m[:dims, dims].reshape(
        dims, *([1] * (points.ndim - 1))
    )


@torch.no_grad()
def fixed_to_moving_world(
    phi: Map, fixed_affine: np.ndarray, fixed_shape: Sequence[int], fixed_unit_to_world: np.ndarray,
    moving_unit_to_world: np.ndarray,
) -> torch.Tensor:
    """Moving-image world points (RAS, mm) ``[D, *fixed_shape]`` (float64) that the fixed image's voxel centres map
    to: ``U_moving(phi(U_fixed^-1(y)))`` for every voxel centre ``y`` of the fixed grid (``fixed_affine``)."""
    inverse = np.linalg.inv(fixed_unit_to_world)
    out = torch.empty(len(fixed_shape), *fixed_shape, dtype=torch.float64)
    for start, stop in _slabs(fixed_shape):
        y = world_points(fixed_affine, fixed_shape, start, stop)
        u = _apply(inverse, y).to(device=phi.device, dtype=phi.dtype)
        v = phi(u.unsqueeze(0))[0].to("cpu", torch.float64)
        out[:, start:stop] = _apply(moving_unit_to_world, v)
    return out


def sample_world(
    image: torch.Tensor, affine: np.ndarray, points: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """Values of ``image`` ``[C, *N]`` (voxel-to-world ``affine``) at world ``points`` ``[D, *P]``: ``[C, *P]``,
    linear (``"bilinear"``) or ``"nearest"``; 0 outside the image (see the module docstring)."""
    dims = points.shape[0]
    size = torch.tensor(image.shape[1:], dtype=torch.float64).reshape(dims, *([1] * (points.ndim - 1)))
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    field = image.float().unsqueeze(0)
    out = torch.empty(image.shape[0], *points.shape[1:], dtype=field.dtype)
    for start, stop in _slabs(points.shape[1:]):
        index = _apply(inverse, points[:, start:stop])
        inside = ((index >= -0.5) & (index <= size - 0.5)).all(0)
        unit = index / (size - 1).clamp(min=1)
        grid = (unit.flip(0).movedim(0, -1) * 2.0 - 1.0).unsqueeze(0).to(field.dtype)
        values = F.grid_sample(field, grid, mode=mode, padding_mode="border", align_corners=True)[0]
        out[:, start:stop] = values * inside.to(values.dtype)
    return out


def sample_labels(label: torch.Tensor, affine: np.ndarray, points: torch.Tensor,
                  limit_bytes: int | None = None) -> torch.Tensor:
    """Integer labels ``[1, *N]`` (voxel-to-world ``affine``) at world ``points`` ``[D, *P]``: ``[*P]`` (int64).

    Each label present (and 0, the value outside the image) gets one channel, interpolated linearly, and every
    point takes the label of its largest channel; so any label values work (``10**6`` costs what ``1`` does) and
    the memory grows with the number of distinct labels, checked first (:func:`check_memory`).
    """
    values, compact = torch.unique(torch.cat([label.reshape(-1).long(), torch.zeros(1, dtype=torch.long)]),
                                   return_inverse=True)
    check_memory(int(np.prod(points.shape[1:])), 2 * len(values), f"warping {len(values)} labels", limit_bytes)
    onehot = one_hot_labels(compact[:-1].reshape(1, 1, *label.shape[1:]), len(values))[0]
    return values[sample_world(onehot, affine, points).argmax(0)]


def label_dtype(labels: torch.Tensor) -> torch.dtype:
    """The smallest integer type that holds these non-negative labels (uint8, int16 or int32)."""
    top = int(labels.max()) if labels.numel() else 0
    return torch.uint8 if top <= 255 else torch.int16 if top <= 32767 else torch.int32


def check_memory(num_voxels: int, channels: int, what: str = "the outputs", limit_bytes: int | None = None) -> None:
    """Refuse work whose ``num_voxels * channels`` float32 arrays (times 3 for temporaries) would not fit in memory.

    Raises:
        MemoryError: with the size needed and the memory available.
    """
    needed = 3 * 4 * int(num_voxels) * int(channels)
    limit_bytes = available_memory() if limit_bytes is None else limit_bytes
    if limit_bytes is None:  # unknown on this platform: do not guess
        return
    if needed > limit_bytes:
        raise MemoryError(f"{what} need about {needed / 2**30:.1f} GiB ({num_voxels} voxels x {channels} channels) but "
                          f"only {limit_bytes / 2**30:.1f} GiB of memory is available; resample the fixed image to a "
                          "coarser grid first.")


def _itk_image(array: np.ndarray, affine: np.ndarray, is_vector: bool = False):
    """An ITK image (LPS geometry) of a MONAI-ordered array ``[*N]`` or ``[*N, C]`` with a RAS ``affine``."""
    import itk

    dims = array.ndim - (1 if is_vector else 0)
    order = tuple(range(dims))[::-1] + ((dims,) if is_vector else ())
    image = itk.image_from_array(np.ascontiguousarray(array.transpose(order)), is_vector=is_vector)
    linear = np.asarray(affine, dtype=np.float64)[:dims, :dims]
    spacing = np.linalg.norm(linear, axis=0)
    flip = _RAS_TO_LPS[:dims, :dims]
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((flip @ np.asarray(affine, dtype=np.float64)[:dims, dims]).tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(flip @ linear / spacing)))
    return image


def write_image(array: np.ndarray, affine: np.ndarray, path: str | Path, what: str = "output") -> Path:
    """Write a scalar image ``[*N]`` (MONAI array order, RAS ``affine``): NIfTI with nibabel, other formats
    (``.mha``, ``.nrrd``, ``.mhd``...) with ITK; atomically (:mod:`monai_icon.apps.atomic_io`).

    Raises:
        WriteError: the file could not be written completely (an earlier file of that name is left intact).
    """
    if is_nifti(path):
        return write_nifti(np.asarray(array), affine, path, what=what)
    import itk

    image = _itk_image(np.asarray(array), affine)
    return atomic_write(path, lambda tmp: run_isolated(lambda: itk.imwrite(image, tmp, compression=True)), what)


def write_displacement(
    displacement: torch.Tensor | np.ndarray, affine: np.ndarray, ddf_path: str | Path | None = None,
    transform_path: str | Path | None = None,
) -> None:
    """Write a world-space displacement field defined on a fixed image's grid (atomically, each file).

    Args:
        displacement: ``[D, *N]`` (D = 2 or 3) RAS millimetres: fixed voxel centre ``y`` maps to moving point
            ``y + d(y)`` (2D: the first two world axes).
        affine: the fixed grid's voxel-to-world (RAS) affine.
        ddf_path: NIfTI (or any ITK format) vector image of the displacement in **LPS** millimetres on the fixed
            grid: ITK's, ANTs' (``*Warp.nii.gz``) and 3D Slicer's displacement-field convention.
        transform_path: ITK transform file (``.h5``/``.hdf5``/``.tfm``) holding an ``itk.DisplacementFieldTransform``
            (fixed-to-moving physical points, as ``itk.ResampleImageFilter``/``antsApplyTransforms`` expect).

    Raises:
        ValueError: not a finite ``[D, *N]`` field.
        WriteError: a file could not be written completely.
    """
    disp = torch.as_tensor(displacement, dtype=torch.float64).numpy()
    dims = disp.shape[0]
    if dims not in (2, 3) or disp.ndim != dims + 1:
        raise ValueError(f"expected a 2D or 3D displacement [D, *N], got shape {disp.shape}.")
    if not np.isfinite(disp).all():
        raise ValueError(f"the displacement holds {int((~np.isfinite(disp)).sum())} NaN or infinite values; "
                         "nothing was written.")
    lps = np.einsum("ij,j...->...i", _RAS_TO_LPS[:dims, :dims], disp)  # [*N, D] in LPS
    import itk

    if ddf_path is not None:
        if is_nifti(ddf_path):
            write_nifti(lps.astype(np.float32), affine, ddf_path, vector=True, what="displacement field")
        else:
            field = _itk_image(lps.astype(np.float32), affine, is_vector=True)
            atomic_write(ddf_path, lambda tmp: run_isolated(lambda: itk.imwrite(field, tmp, compression=True)),
                         "displacement field")
    if transform_path is not None:
        transform = itk.DisplacementFieldTransform[itk.D, dims].New()
        transform.SetDisplacementField(_itk_image(lps, affine, is_vector=True))
        atomic_write(transform_path,
                     lambda tmp: run_isolated(lambda: itk.transformwrite([transform], tmp, compression=True)),
                     "transform")
