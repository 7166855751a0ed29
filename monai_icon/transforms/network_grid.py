# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Bringing an image onto a registration network's grid while keeping track of where every network voxel lies in
the world: :func:`to_network_grid`, its settings as one value (:class:`NetworkGrid`, a model's preprocessing) and
the dictionary transform :class:`ToNetworkGridd` for MONAI pipelines (training on images prepared exactly as
``monai-icon register`` prepares them)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Orientation, Resize, ScaleIntensityRange

from monai_icon import backend

from monai_icon.transforms.laterality import left_right_axis, normalise_side

__all__ = ["to_network_grid", "NetworkGrid", "ToNetworkGridd", "isotropic_grid"]


def to_network_grid(
    image: MetaTensor,
    spatial_size: Sequence[int],
    axcodes: str | None = None,
    percentiles: tuple[float, float] | None = (1.0, 99.0),
    side: str | None = None,
    target_side: str | None = None,
    window: tuple[float, float] | None = None,
    resize_mode: str = "area",
    reverse_axes: bool = False,
    normalise_first: bool = False,
) -> MetaTensor:
    """Resample an image onto a network grid, keeping track of where every network voxel lies in the world.

    Steps: reorient to ``axcodes`` (if given); reverse the order of the spatial axes when ``reverse_axes`` (ITK's
    z, y, x array order, as networks trained with ITK-loaded arrays expect); resize to ``spatial_size``
    (``resize_mode``: ``"area"`` = average pooling when shrinking, or ``"trilinear"``); mirror the array along its
    left-right axis when ``side`` differs from ``target_side``; normalise intensities (``window``: this fixed
    range to 0..1, e.g. CT ``(-1000, 1000)``; else ``percentiles`` to 0 and 1), clamped, before resizing when
    ``normalise_first``. Every step updates the affine so that the world image is unchanged (the network may see a
    mirrored or transposed array; the physical transform stays right).

    Returns:
        float32 MetaTensor ``[C, *spatial_size]`` whose affine maps network voxel indices to world (RAS, mm).
    """
    if image.ndim - 1 != len(spatial_size):
        raise ValueError(f"the network grid {tuple(spatial_size)} is {len(spatial_size)}D but the image is "
                         f"{image.ndim - 1}D (shape {tuple(image.shape[1:])}).")
    out = _as_meta(image.float())
    if axcodes is not None:
        out = _as_meta(Orientation(axcodes=axcodes, labels=None)(out))
    if reverse_axes:
        dims = out.ndim - 1
        order = list(range(dims))[::-1]
        out = _with_affine(out.as_tensor().permute(0, *[d + 1 for d in order]), out, out.affine[:, [*order, dims]])
    if normalise_first:
        out = _normalise(out, window, percentiles)
    out = _as_meta(Resize(tuple(spatial_size), mode=resize_mode)(out))
    if side is not None and target_side is not None and normalise_side(side) != normalise_side(target_side):
        axis = left_right_axis(out.affine)
        flip = torch.eye(out.affine.shape[0], dtype=out.affine.dtype)
        flip[axis, axis], flip[axis, -1] = -1.0, float(out.shape[axis + 1] - 1)
        out = _with_affine(torch.flip(out.as_tensor(), dims=[axis + 1]), out, out.affine @ flip)
    return out if normalise_first else _normalise(out, window, percentiles)


def _as_meta(image: Any) -> MetaTensor:
    """``image`` as a MetaTensor: MONAI's array transforms return one for a MetaTensor input (their annotations
    say ``Tensor``), so anything else is an error in the pipeline."""
    if not isinstance(image, MetaTensor):
        raise TypeError(f"expected a MetaTensor carrying the affine, got {type(image).__name__}.")
    return image


def _with_affine(array: torch.Tensor, like: MetaTensor, affine: torch.Tensor) -> MetaTensor:
    meta = {k: v for k, v in like.meta.items() if k != "affine"}
    return MetaTensor(array.contiguous(), affine=affine, meta=meta)


def _normalise(
    image: MetaTensor, window: tuple[float, float] | None, percentiles: tuple[float, float] | None
) -> MetaTensor:
    if window is not None:
        return _as_meta(ScaleIntensityRange(window[0], window[1], 0.0, 1.0, clip=True)(image))
    if percentiles is not None:
        low, high = percentile_range(image.as_tensor(), percentiles)
        return _as_meta(ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(image))
    return image


def percentile_range(image: torch.Tensor, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The ``percentiles`` (in ``[0, 100]``) of all of ``image``'s values, as MONAI's
    ``ScaleIntensityRangePercentiles`` computes them (linear interpolation between order statistics): on the CPU
    by the backend's selection (:func:`monai_icon.backend.quantiles`), elsewhere by ``torch.kthvalue`` (which, unlike
    ``torch.quantile``, takes images of any size). ``nan`` if any value is ``nan``."""
    q = [float(p) / 100.0 for p in percentiles]
    values = backend.quantiles(image, q)
    if values is not None:
        return float(values[0]), float(values[1])
    flat = image.detach().reshape(-1).float()
    if bool(torch.isnan(flat).any()):
        return float("nan"), float("nan")
    n = flat.numel()
    out = []
    for fraction in q:
        position = fraction * (n - 1)
        k = min(int(position), n - 1)
        lower = flat.kthvalue(k + 1).values
        upper = flat.kthvalue(min(k + 2, n)).values
        out.append(float(torch.lerp(lower, upper, position - k)))
    return out[0], out[1]


@dataclass(frozen=True)
class NetworkGrid:
    """How images reach a network (a model's preprocessing): the arguments of :func:`to_network_grid` but the image
    and its side, as one value.

    Attributes:
        spatial_size: the network grid (e.g. ``(192, 192, 80)``).
        axcodes: orientation images are brought to before resizing (``None``: the file's array order).
        percentiles: intensity percentiles mapped to 0 and 1 (``None``: intensities unchanged).
        target_side: knee side the model was trained on (``None`` for non-knee models).
        window: a fixed intensity range mapped to 0 and 1 instead of the percentiles (e.g. CT ``(-1000, 1000)``).
        resize_mode, reverse_axes, normalise_first: see :func:`to_network_grid`.
        isotropic: bring each pair onto a grid shaped like the fixed image's field of view in millimetres (one
            spacing on every axis) with about as many voxels as ``spatial_size``, each size a multiple of
            ``size_multiple`` (:meth:`size_for`), instead of ``spatial_size`` itself: images whose field of view has
            another aspect than the training images' are not stretched differently along each axis.
        size_multiple: see ``isotropic`` (the network's sizes must divide by its downsampling).
    """

    spatial_size: tuple[int, ...]
    axcodes: str | None = None
    percentiles: tuple[float, float] | None = (1.0, 99.0)
    target_side: str | None = None
    window: tuple[float, float] | None = None
    resize_mode: str = "area"
    reverse_axes: bool = False
    normalise_first: bool = False
    isotropic: bool = False
    size_multiple: int = 16

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> NetworkGrid:
        """The grid of a model's settings (``spatial_size`` required; other keys, e.g. the loss's, ignored)."""
        if "spatial_size" not in settings:
            raise ValueError("the network grid needs settings['spatial_size'].")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in settings.items() if k in names}
        values["spatial_size"] = tuple(int(s) for s in values["spatial_size"])
        for key in ("percentiles", "window"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def field_of_view(self, image: MetaTensor) -> tuple[float, ...]:
        """The extent of ``image`` (``[C, *N]`` with its affine) along the axes of this grid, in the affine's units
        (mm): voxels times spacing, after the reorientation to ``axcodes`` and the axis reversal of
        :func:`to_network_grid` (which resizes this field of view onto the grid, whatever its aspect)."""
        affine = np.asarray(image.affine if isinstance(image, MetaTensor) else np.eye(image.ndim), dtype=np.float64)
        dims = image.ndim - 1
        spacing = np.linalg.norm(affine[:dims, :dims], axis=0)
        extent = [float(n * s) for n, s in zip(image.shape[1:], spacing)]
        if self.axcodes is not None:
            transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                        nib.orientations.axcodes2ornt(self.axcodes))
            reoriented = [0.0] * dims
            for axis, (target, _) in enumerate(transform):
                reoriented[int(target)] = extent[axis]
            extent = reoriented
        return tuple(extent[::-1] if self.reverse_axes else extent)

    def size_for(self, fixed: MetaTensor) -> tuple[int, ...]:
        """The network grid of a pair whose fixed image is ``fixed``: ``spatial_size``, or with ``isotropic`` the
        grid of about as many voxels shaped like ``fixed``'s field of view (:func:`isotropic_grid`)."""
        if not self.isotropic:
            return tuple(self.spatial_size)
        voxels = int(np.prod(self.spatial_size))
        least = (2 * self.size_multiple) ** len(self.spatial_size)
        return isotropic_grid(self.field_of_view(fixed), max(voxels, least), self.size_multiple)

    def apply(self, image: MetaTensor, side: str | None = None, size: Sequence[int] | None = None,
              labels: bool = False) -> MetaTensor:
        """``image`` on this grid (or on ``size``, the same field of view; e.g. the finer grid of a refinement);
        ``labels``: a label map or mask (nearest resizing, intensities unchanged)."""
        size = self.spatial_size if size is None else size
        if labels:
            return to_network_grid(image, size, self.axcodes, None, side, self.target_side, None, "nearest",
                                   self.reverse_axes)
        return to_network_grid(image, size, self.axcodes, self.percentiles, side, self.target_side, self.window,
                               self.resize_mode, self.reverse_axes, self.normalise_first)


class ToNetworkGridd(MapTransform):
    """Bring channel-first images (``MetaTensor`` with their affines, e.g. from ``LoadImaged(...,
    ensure_channel_first=True)``) onto a model's network grid exactly as ``monai-icon register`` does
    (:func:`to_network_grid`: reorientation, axis order, resizing, intensity normalisation); the affine of the result
    maps network voxels to the world.

    Args:
        keys: image keys.
        settings: grid settings of a model (``spatial_size`` required; ``axcodes``, ``percentiles``, ``window``,
            ``target_side``, ``resize_mode``, ``reverse_axes``, ``normalise_first`` optional, as
            :class:`~monai_icon.apps.RegistrationModel`), or a :class:`NetworkGrid`; other keys (the loss settings)
            are ignored.
        allow_missing_keys: as MONAI's ``MapTransform``.
    """

    def __init__(self, keys: KeysCollection, settings: Mapping[str, Any] | NetworkGrid,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(settings, NetworkGrid) and "spatial_size" not in settings:
            raise ValueError("ToNetworkGridd needs settings['spatial_size'] (the network grid).")
        self.grid = settings if isinstance(settings, NetworkGrid) else NetworkGrid.from_settings(settings)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"ToNetworkGridd needs a MetaTensor with its affine under {key!r} (load it with "
                                f"LoadImaged(..., ensure_channel_first=True)), got {type(image).__name__}.")
            d[key] = self.grid.apply(image)
        return d


def isotropic_grid(extent: Sequence[float], voxels: int, multiple: int = 2) -> tuple[int, ...]:
    """A grid of about ``voxels`` voxels with one spacing on every axis over a field of view ``extent`` (any units):
    each size a multiple of ``multiple`` (so that the grid halves exactly), at least ``2 * multiple``.

    Raises:
        ValueError: a non-positive extent or a voxel count below ``(2 * multiple) ** len(extent)``.
    """
    if not extent or any(not (e > 0 and e < float("inf")) for e in extent):
        raise ValueError(f"the field of view must be positive and finite on every axis, got {tuple(extent)}.")
    least = (2 * multiple) ** len(extent)
    if isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < least:
        raise ValueError(f"a grid of {len(extent)} axes needs voxels >= {least}, got {voxels!r}.")
    per_unit = (voxels / float(np.prod(extent))) ** (1.0 / len(extent))
    return tuple(max(2 * multiple, multiple * int(round(e * per_unit / multiple))) for e in extent)
