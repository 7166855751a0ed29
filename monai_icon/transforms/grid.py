# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Does the network grid fit the data? The voxel spacing an image gets once reoriented and resized to it.

The preprocessing reorients every image to ``axcodes`` and then resizes it to the network grid, axis by axis. The
grid's axes follow the *reoriented* array: a grid written for the file's own array order silently stretches one
axis and squeezes another once a reorientation permutes them. For example, the embedded T1 head
(docs/train_3d.md) is stored (L, S, A) with 128 x 128 x 62 voxels of 2 x 2 x 3 mm; reoriented to RAS it is
128 x 62 x 128, and a 128 x 128 x 64 grid would give the anterior axis 1.45 mm and the superior axis 4 mm voxels
instead of 2.9 and 2 mm. :func:`check_network_grid` warns about such grids.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["reoriented_geometry", "network_grid_spacing", "check_network_grid"]


def reoriented_geometry(path: str | Path, axcodes: str | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Array shape and voxel spacing (mm) of the image file at ``path`` after reorientation to ``axcodes``
    (``None``: the file's own order), read from its header only.

    Raises:
        FileNotFoundError / ValueError: a missing file, or one that is not a 3D (or 2D) image volume.
    """
    import nibabel as nib
    from nibabel import orientations

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    image = nib.load(str(path))
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise ValueError(f"{path} is not an image volume.")
    dims = min(len(image.shape), 3)
    shape = tuple(int(n) for n in image.shape[:dims])
    spacing = tuple(float(z) for z in image.header.get_zooms()[:dims])
    if axcodes is None:
        return shape, spacing
    if len(axcodes) != dims:
        raise ValueError(f"axcodes {axcodes!r} has {len(axcodes)} axes, the image {dims}.")
    source = orientations.io_orientation(image.affine)[:dims]
    transform = orientations.ornt_transform(source, orientations.axcodes2ornt(axcodes))
    new_shape, new_spacing = [0] * dims, [0.0] * dims
    for axis, (target, _flip) in enumerate(transform):
        new_shape[int(target)], new_spacing[int(target)] = shape[axis], spacing[axis]
    return tuple(new_shape), tuple(new_spacing)


def network_grid_spacing(path: str | Path, spatial_size: Sequence[int],
                         axcodes: str | None) -> tuple[float, ...]:
    """Voxel spacing (mm) per axis of the image at ``path`` once reoriented to ``axcodes`` and resized to
    ``spatial_size`` (the preprocessing of :func:`~monai_icon.transforms.oai_preprocessing`)."""
    return _resized_spacing(*reoriented_geometry(path, axcodes), spatial_size)


def _resized_spacing(shape: Sequence[int], spacing: Sequence[float], spatial_size: Sequence[int]) -> tuple[float, ...]:
    if len(spatial_size) != len(shape):
        raise ValueError(f"spatial_size {tuple(spatial_size)} has {len(spatial_size)} axes, the image {len(shape)}.")
    return tuple(n * s / int(m) for n, s, m in zip(shape, spacing, spatial_size))


def check_network_grid(path: str | Path, spatial_size: Sequence[int], axcodes: str | None,
                       max_stretch: float = 2.0) -> tuple[float, ...]:
    """Warn when resizing the image at ``path`` (reoriented to ``axcodes``) to ``spatial_size`` changes the voxel
    size of one axis ``max_stretch`` times more than that of another (e.g. one axis upsampled by 2 while another
    is pooled by 2): the grid was probably written for another array order. Returns the grid's spacing (mm)."""
    shape, spacing = reoriented_geometry(path, axcodes)  # the header is read once
    grid = _resized_spacing(shape, spacing, spatial_size)
    factors = np.asarray(grid) / np.asarray(spacing)
    if float(factors.max() / factors.min()) > max_stretch:
        suggestion = tuple(int(round(n / float(np.median(factors)))) for n in shape)
        warnings.warn(
            f"the network grid {tuple(int(m) for m in spatial_size)} resizes {Path(path).name} (reoriented to "
            f"{axcodes}: {shape} voxels of {tuple(round(s, 2) for s in spacing)} mm) to voxels of "
            f"{tuple(round(g, 2) for g in grid)} mm: one axis is stretched {factors.max() / factors.min():.1f} times "
            f"more than another. Give the grid in the reoriented axis order, e.g. about {suggestion}.",
            stacklevel=2,
        )
    return grid
