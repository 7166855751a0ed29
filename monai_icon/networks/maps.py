# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Coordinate maps kept as functions.

Conventions (shared with the ICON reference, see ``docs/conventions.md`` sections 1-2):

* Coordinates live in ``[0, 1]^D`` with ``0`` and ``1`` on the centres of the first and last voxel of each
  axis: ``identity[d] = index_d / (N_d - 1)`` (``align_corners=True`` semantics).
* A coordinate tensor has shape ``[B, D, *points]``; channel ``d`` is the coordinate along tensor axis
  ``2 + d`` of the images (array index order, *not* x/y/z).
* A map ``phi_AB`` returned by ``block(image_A, image_B)`` is a pull-back: it takes points of ``image_B``'s
  space to points of ``image_A``'s space, so that ``image_A o phi_AB ~ image_B``.
* Maps are callables, never resampled grids: composing two maps composes the functions exactly, and each map
  can still be evaluated on any grid (``Map.grid``), converted to a MONAI voxel DDF (``Map.ddf``) or used to
  warp an image (``Map.warp``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from monai_icon import backend
from monai_icon.precision import at_least_float32

__all__ = [
    "identity_grid",
    "interpolate",
    "resize_linear",
    "map_grid_to_ddf",
    "ddf_to_map_grid",
    "Map",
    "DisplacementMap",
    "AffineMap",
    "ComposedMap",
    "IdentityMap",
    "as_map",
    "one_hot_labels",
    "warp_labels",
]


def _spatial_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 2, 3) or any(s < 1 for s in shape):
        raise ValueError(f"a spatial shape must have 1 to 3 positive sizes, got {shape}.")
    return shape


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The identity map sampled on a grid of ``shape``.

    Args:
        shape: spatial shape ``(N_0, ..., N_{D-1})``.
        device, dtype: of the returned tensor.

    Returns:
        tensor ``[1, D, *shape]``, channel ``d`` equal to ``index_d / (N_d - 1)`` (0 on axes of size 1).
    """
    shape = _spatial_shape(shape)
    axes = [
        torch.linspace(0.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype)
        for n in shape
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _voxel_scale(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``N_d - 1`` per axis, shaped ``[1, D, 1, ..., 1]`` to broadcast against ``[B, D, *shape]``."""
    scale = torch.tensor([max(n - 1, 0) for n in shape], device=like.device, dtype=like.dtype)
    return scale.reshape(1, len(shape), *([1] * len(shape)))


def interpolate(
    field: torch.Tensor, points: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Evaluate a sampled field (an image or a displacement) at arbitrary points.

    Args:
        field: ``[B, C, *N]`` values on the voxel grid (``D = len(N)`` is 2 or 3).
        points: ``[B, D, *P]`` (or ``[1, D, *P]``, broadcast over the batch) coordinates in ``[0, 1]`` units;
            ``*P`` is any shape (a grid, a list of points, ...).
        mode: ``"bilinear"`` (linear in 2D and 3D) or ``"nearest"``, as in ``torch.nn.functional.grid_sample``.
        padding_mode: how to extrapolate outside ``[0, 1]``: ``"border"`` (default), ``"zeros"`` or
            ``"reflection"``.

    Returns:
        ``[B, C, *P]`` interpolated values, differentiable with respect to ``field`` and ``points``.

    The sampling is ``grid_sample``'s unless the CPU backend's hook (:func:`monai_icon.backend.sample`) runs a
    faster kernel for it (large linear border-padded 3D float32 samplings on the CPU, the same values up to float
    rounding; :mod:`monai_icon.backend.trilinear`, ``docs/benchmarks.md``).
    """
    spatial_dims = field.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"field must be [B, C, H, W] or [B, C, H, W, D], got shape {tuple(field.shape)}.")
    if points.ndim < 2 or points.shape[1] != spatial_dims:
        raise ValueError(
            f"points must be [B, {spatial_dims}, ...] for a {spatial_dims}D field, got shape {tuple(points.shape)}."
        )
    batch = field.shape[0]
    if points.shape[0] != batch:
        if points.shape[0] != 1:
            raise ValueError(f"batch sizes differ: field {batch}, points {points.shape[0]}.")
        points = points.expand(batch, *points.shape[1:])
    point_shape = points.shape[2:]
    values = backend.sample(field, points.reshape(batch, spatial_dims, -1), mode, padding_mode)  # None: not run
    if values is not None:
        return values.reshape(batch, field.shape[1], *point_shape)
    # grid_sample wants [B, *out, D] with the last-axis coordinate first, in [-1, 1].
    grid = points.reshape(batch, spatial_dims, -1).flip(1).movedim(1, -1) * 2.0 - 1.0
    grid = grid.reshape(batch, -1, *([1] * (spatial_dims - 1)), spatial_dims)
    values = F.grid_sample(field, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return values.reshape(batch, field.shape[1], *point_shape)


def resize_linear(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``[B, C, *N]`` values on a voxel grid to ``[B, C, *size]`` by (bi/tri)linear interpolation with
    corner-aligned grids: the values of ``F.interpolate(field, size, mode="bilinear"/"trilinear",
    align_corners=True)``, i.e. of the field's linear interpolant at the points of ``identity_grid(size)``.

    The CPU backend's hook :func:`monai_icon.backend.resize` computes it where it pays (matrix products on CPU
    fields; the same values up to rounding), ``F.interpolate`` everywhere else.

    Args:
        field: ``[B, C, *N]`` with 1 to 3 spatial axes.
        size: the output's spatial shape (one positive size per spatial axis).

    Returns:
        ``[B, C, *size]``, differentiable with respect to ``field``.
    """
    spatial_dims = field.ndim - 2
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"field must be [B, C] + 1 to 3 spatial axes, got shape {tuple(field.shape)}.")
    size = _spatial_shape(size)
    if len(size) != spatial_dims:
        raise ValueError(f"a field with {spatial_dims} spatial axes needs {spatial_dims} sizes, got {size}.")
    if tuple(field.shape[2:]) == size:
        return field
    out = backend.resize(field, size)  # None: not run
    if out is not None:
        return out
    mode = ("linear", "bilinear", "trilinear")[spatial_dims - 1]
    return F.interpolate(field, size=size, mode=mode, align_corners=True)


def map_grid_to_ddf(grid: torch.Tensor) -> torch.Tensor:
    """Convert a map sampled on the identity grid to a MONAI dense displacement field.

    Args:
        grid: ``[B, D, *N]`` map values in ``[0, 1]`` units at the points of ``identity_grid(N)``.

    Returns:
        ``[B, D, *N]`` displacement in voxels, channel ``i`` along axis ``i + 2``:
        ``ddf[:, i] = (grid[:, i] - identity[:, i]) * (N_i - 1)``, the input of ``monai.networks.blocks.Warp``.
    """
    shape = grid.shape[2:]
    return (grid - identity_grid(shape, grid.device, grid.dtype)) * _voxel_scale(shape, grid)


def ddf_to_map_grid(ddf: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_grid_to_ddf`: a MONAI voxel DDF ``[B, D, *N]`` to map values in ``[0, 1]`` units.

    Axes of size 1 carry no displacement (their coordinate is always 0).
    """
    shape = ddf.shape[2:]
    scale = _voxel_scale(shape, ddf)
    return identity_grid(shape, ddf.device, ddf.dtype) + ddf / scale.clamp(min=1)


class Map:
    """A batch of coordinate maps ``[0, 1]^D -> R^D`` (pull-backs, see the module docstring).

    Subclasses implement :meth:`__call__`. Every map knows its batch size, spatial dimension, device and dtype,
    and supports composition (``phi @ psi`` is ``x -> phi(psi(x))``), dense evaluation, conversion to a MONAI
    voxel DDF and warping.
    """

    batch_size: int
    spatial_dims: int
    device: torch.device
    dtype: torch.dtype

    def __call__(self, points: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Map ``[B, D, *P]`` (or ``[1, D, *P]``) coordinates in ``[0, 1]`` units to ``[B, D, *P]`` coordinates."""
        raise NotImplementedError

    def _check_points(self, points: torch.Tensor) -> None:
        if points.ndim < 2 or points.shape[1] != self.spatial_dims:
            raise ValueError(
                f"points must be [B, {self.spatial_dims}, ...] for a {self.spatial_dims}D map, "
                f"got shape {tuple(points.shape)}."
            )
        if points.shape[0] not in (1, self.batch_size):
            raise ValueError(f"points have batch size {points.shape[0]}, the map has {self.batch_size}.")

    def compose(self, inner: Map) -> ComposedMap:
        """``self o inner``: the map ``x -> self(inner(x))``."""
        return ComposedMap(self, inner)

    def __matmul__(self, inner: Map) -> ComposedMap:
        return self.compose(inner)

    def grid(self, shape: Sequence[int]) -> torch.Tensor:
        """The map evaluated on the identity grid of ``shape``: ``[B, D, *shape]`` in ``[0, 1]`` units."""
        shape = _spatial_shape(shape)
        if len(shape) != self.spatial_dims:
            raise ValueError(f"a {self.spatial_dims}D map needs a {self.spatial_dims}D grid shape, got {shape}.")
        out = self(identity_grid(shape, self.device, self.dtype))
        return out.expand(self.batch_size, *out.shape[1:]) if out.shape[0] != self.batch_size else out

    def ddf(self, shape: Sequence[int]) -> torch.Tensor:
        """The map as a MONAI dense displacement field on a grid of ``shape``: ``[B, D, *shape]`` in voxels,
        usable with ``monai.networks.blocks.Warp`` (see :func:`map_grid_to_ddf`)."""
        return map_grid_to_ddf(self.grid(shape))

    def sampled(self, shape: Sequence[int], identity: torch.Tensor | None = None) -> DisplacementMap:
        """The map sampled on the identity grid of ``shape`` as one displacement field: exact at the grid points,
        linearly interpolated between them (a composition then costs one interpolation per query point).
        ``identity``: ``identity_grid(shape)`` when the caller already has it (same device and dtype)."""
        if identity is None:
            identity = identity_grid(shape, self.device, self.dtype)
        return DisplacementMap(self.grid(shape) - identity)

    def warp(
        self,
        image: torch.Tensor,
        shape: Sequence[int] | None = None,
        mode: str = "bilinear",
        padding_mode: str = "border",
    ) -> torch.Tensor:
        """Warp ``image`` by this map: ``image o phi`` sampled on a grid of ``shape``.

        Args:
            image: ``[B, C, *N]`` image (any number of channels).
            shape: output grid, defaults to the image's spatial shape.
            mode, padding_mode: as in :func:`interpolate`.

        Returns:
            ``[B, C, *shape]`` warped image.
        """
        if image.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"a {self.spatial_dims}D map warps [B, C, *spatial] images with {self.spatial_dims} spatial "
                f"dimensions, got shape {tuple(image.shape)}."
            )
        coords = self.grid(image.shape[2:] if shape is None else shape)
        return interpolate(image, coords, mode=mode, padding_mode=padding_mode)


class DisplacementMap(Map):
    """``phi(x) = x + interp(displacement)(x)``, the paper's Eq. (11).

    The displacement (not the map) is linearly interpolated at the query points and extrapolated with its
    border values, so the map is continuous and defined everywhere.

    Args:
        displacement: ``[B, D, *N]`` displacement in ``[0, 1]`` units on the identity grid of ``N``; a float16 /
            bfloat16 one (a network's output under mixed precision) is converted to float32, in which the map
            computes its coordinates.
    """

    def __init__(self, displacement: torch.Tensor) -> None:
        if displacement.ndim not in (4, 5) or displacement.shape[1] != displacement.ndim - 2:
            raise ValueError(
                "displacement must be [B, 2, H, W] or [B, 3, H, W, D] (one channel per spatial axis), "
                f"got shape {tuple(displacement.shape)}."
            )
        displacement = at_least_float32(displacement)
        self.displacement = displacement
        self.batch_size = displacement.shape[0]
        self.spatial_dims = displacement.ndim - 2
        self.device = displacement.device
        self.dtype = displacement.dtype

    @classmethod
    def from_ddf(cls, ddf: torch.Tensor) -> DisplacementMap:
        """Build the map of a MONAI voxel DDF ``[B, D, *N]`` (channel ``i`` in voxels along axis ``i + 2``)."""
        if ddf.ndim not in (4, 5) or ddf.shape[1] != ddf.ndim - 2:
            raise ValueError(f"a DDF must be [B, 2, H, W] or [B, 3, H, W, D], got shape {tuple(ddf.shape)}.")
        return cls(ddf / _voxel_scale(ddf.shape[2:], ddf).clamp(min=1))

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self._check_points(points)
        return points + interpolate(self.displacement, points)

    def grid(self, shape: Sequence[int]) -> torch.Tensor:
        """The map on the identity grid of ``shape``: the displacement itself on its own grid, otherwise its
        (bi/tri)linear resampling (``align_corners=True``, the same values as interpolating at the grid points)."""
        shape = _spatial_shape(shape)
        if len(shape) != self.spatial_dims:
            raise ValueError(f"a {self.spatial_dims}D map needs a {self.spatial_dims}D grid shape, got {shape}.")
        displacement = resize_linear(self.displacement, shape)
        return identity_grid(shape, self.device, self.dtype) + displacement

    def inverse(self, iterations: int = 20) -> DisplacementMap:
        """The inverse map on the same grid, by the fixed-point iteration ``v <- -u(x + v)`` (``u`` this map's
        displacement, ``v`` the inverse's): ``phi^-1(x) = x + v(x)`` solves ``phi(phi^-1(x)) = x`` at the grid
        points. It converges where the map is invertible and its displacement changes by less than one voxel per
        voxel (a map without folds, e.g. an inverse-consistent network's); each iteration costs one interpolation
        of the field at its own grid points.

        Args:
            iterations: fixed-point iterations (>= 1; the error shrinks geometrically, by the displacement's largest
                derivative per iteration).
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}.")
        identity = identity_grid(self.displacement.shape[2:], self.device, self.dtype)
        inverse = -self.displacement
        for _ in range(iterations):
            inverse = -interpolate(self.displacement, identity + inverse)
        return DisplacementMap(inverse)

    def flipped(self, axes: Sequence[int]) -> DisplacementMap:
        """This map conjugated by the reflection ``R`` of ``axes`` (``x_a -> 1 - x_a``): ``R o phi o R``, exact
        on the same grid. If ``phi`` registers the flipped images ``A o R`` and ``B o R``, the result registers
        ``A`` and ``B`` (``A o R o phi o R ~ B``).

        Args:
            axes: spatial axes (``0 .. spatial_dims - 1``, array order), each at most once.
        """
        axes = [int(a) for a in axes]
        if len(set(axes)) != len(axes) or any(a < 0 or a >= self.spatial_dims for a in axes):
            raise ValueError(f"axes must be distinct spatial axes in [0, {self.spatial_dims}), got {axes}.")
        if not axes:
            return self
        displacement = self.displacement.flip([a + 2 for a in axes])
        sign = torch.ones(self.spatial_dims, device=self.device, dtype=self.dtype)
        sign[axes] = -1.0
        return DisplacementMap(displacement * sign.reshape(1, -1, *([1] * self.spatial_dims)))


class AffineMap(Map):
    """``phi(x) = M x + t`` in ``[0, 1]`` coordinates.

    Args:
        matrix: ``[B, D, D + 1]`` homogeneous matrices ``[M | t]`` acting on ``[0, 1]`` coordinates in array
            index order (float16 / bfloat16 is converted to float32).

    Points are mapped with elementwise products and sums, not a matrix product, whose precision
    ``torch.autocast``, TF32 and ``torch.set_float32_matmul_precision`` lower.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 3 or matrix.shape[1] not in (2, 3) or matrix.shape[2] != matrix.shape[1] + 1:
            raise ValueError(f"matrix must be [B, D, D + 1] with D in (2, 3), got shape {tuple(matrix.shape)}.")
        matrix = at_least_float32(matrix)
        self.matrix = matrix
        self.batch_size = matrix.shape[0]
        self.spatial_dims = matrix.shape[1]
        self.device = matrix.device
        self.dtype = matrix.dtype

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self._check_points(points)
        flat = points.reshape(points.shape[0], self.spatial_dims, 1, -1)  # [B or 1, D_in, 1, P]
        out = self.matrix[:, :, -1:]  # translation, [B, D_out, 1]
        for j in range(self.spatial_dims):
            out = out + self.matrix[:, :, j : j + 1] * flat[:, j]
        return out.reshape(self.batch_size, self.spatial_dims, *points.shape[2:])


class ComposedMap(Map):
    """``outer o inner``: ``x -> outer(inner(x))``, exact (no resampling of either map)."""

    def __init__(self, outer: Map, inner: Map) -> None:
        if outer.spatial_dims != inner.spatial_dims:
            raise ValueError(f"cannot compose a {outer.spatial_dims}D map with a {inner.spatial_dims}D map.")
        if outer.batch_size != inner.batch_size:
            raise ValueError(f"cannot compose maps of batch sizes {outer.batch_size} and {inner.batch_size}.")
        self.outer, self.inner = outer, inner
        self.batch_size = outer.batch_size
        self.spatial_dims = outer.spatial_dims
        self.device = outer.device
        self.dtype = outer.dtype

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(points))

    def grid(self, shape: Sequence[int]) -> torch.Tensor:
        """``outer`` at the points of ``inner`` on the grid (so that ``inner`` can use its own grid fast path)."""
        inner = self.inner.grid(shape)
        out = self.outer(inner)
        return out.expand(self.batch_size, *out.shape[1:]) if out.shape[0] != self.batch_size else out


class IdentityMap(Map):
    """The identity map for a batch of ``batch_size`` ``spatial_dims``-D images."""

    def __init__(
        self,
        batch_size: int,
        spatial_dims: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.batch_size = int(batch_size)
        self.spatial_dims = int(spatial_dims)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self._check_points(points)
        return points


def as_map(phi: Map | torch.Tensor) -> Map:
    """Return ``phi`` if it is a :class:`Map`; read a tensor as a MONAI voxel DDF (``[B, D, *N]``)."""
    if isinstance(phi, Map):
        return phi
    if isinstance(phi, torch.Tensor):
        return DisplacementMap.from_ddf(phi)
    raise ValueError(f"expected a Map or a voxel DDF tensor, got {type(phi).__name__}.")


def one_hot_labels(label: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, 1, *N]`` integer labels in ``[0, num_classes)`` to a ``[B, num_classes, *N]`` one-hot tensor."""
    if label.ndim < 3 or label.shape[1] != 1:
        raise ValueError(f"label must be [B, 1, *spatial] integer labels, got shape {tuple(label.shape)}.")
    labels = label.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}].")
    return F.one_hot(labels[:, 0], num_classes).movedim(-1, 1).to(dtype)


def warp_labels(label: torch.Tensor, coords: torch.Tensor, num_classes: int, mode: str = "linear") -> torch.Tensor:
    """Warp an integer label map and return it one-hot.

    Args:
        label: ``[B, 1, *N]`` integer labels in ``[0, num_classes)``.
        coords: ``[B, D, *M]`` map values in ``[0, 1]`` units (e.g. ``phi_AB.grid(fixed_shape)``).
        num_classes: number of classes including background.
        mode: ``"linear"``: interpolate the one-hot channels linearly and take the arg-max (smooth boundaries);
            ``"nearest"``: nearest-neighbour lookup of the labels.

    Returns:
        ``[B, num_classes, *M]`` one-hot float tensor.
    """
    if label.ndim != coords.ndim:
        raise ValueError(
            f"label must be [B, 1, *spatial] matching coords, got {tuple(label.shape)} and {tuple(coords.shape)}."
        )
    onehot = one_hot_labels(label, num_classes, coords.dtype)
    if mode == "nearest":
        warped = interpolate(label.to(coords.dtype), coords, mode="nearest").round().long()
    elif mode == "linear":
        warped = interpolate(onehot, coords).argmax(dim=1, keepdim=True)
    else:
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}.")
    return one_hot_labels(warped, num_classes, coords.dtype)
