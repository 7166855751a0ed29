# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Inverse consistency loss (paper Eq. 5, 15, 16), evaluated at random off-grid points."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_icon.losses._reduction import reduce
from monai_icon.networks.maps import Map, as_map, identity_grid

__all__ = ["voxel_size", "sample_points", "resolve_shape", "inverse_consistency", "InverseConsistencyLoss"]


def voxel_size(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """One voxel in ``[0, 1]`` units per axis, ``1 / (N_d - 1)`` (0 for axes of size 1), shaped
    ``[1, D, 1, ..., 1]`` to broadcast against ``[B, D, *shape]``."""
    size = torch.tensor([1.0 / (n - 1) if n > 1 else 0.0 for n in shape], device=like.device, dtype=like.dtype)
    return size.reshape(1, len(shape), *([1] * len(shape)))


def sample_points(
    shape: Sequence[int],
    batch_size: int,
    sigma: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    fraction: float = 1.0,
) -> torch.Tensor:
    """Grid points of ``shape`` jittered by Gaussian noise of ``sigma`` voxels per axis (Eq. 16).

    Args:
        fraction: in ``(0, 1]``; below 1, a random subset of ``ceil(fraction * N)`` grid points per pair (drawn
            uniformly with replacement, then jittered) instead of all ``N``: the mean over them is an unbiased
            estimate of the mean over the whole jittered grid, at ``fraction`` of the evaluation cost.

    Returns:
        ``[batch_size, D, *shape]`` coordinates in ``[0, 1]`` units (the noise is independent per pair, point and
        axis; points may fall slightly outside ``[0, 1]``, where displacements extrapolate by their border);
        ``[batch_size, D, M]`` with a ``fraction`` below 1. ``sigma = 0`` gives the grid itself, expanded over the
        batch.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    grid = identity_grid(shape, device, dtype)
    if fraction < 1.0:
        flat = grid.reshape(1, len(shape), -1)
        count = max(1, math.ceil(fraction * flat.shape[2]))
        index = torch.randint(flat.shape[2], (batch_size, 1, count), device=flat.device)
        points = torch.gather(flat.expand(batch_size, -1, -1), 2, index.expand(-1, len(shape), -1))
        noise = torch.randn(points.shape, device=device, dtype=dtype)
        return points + noise * (sigma * voxel_size(shape, grid).reshape(1, len(shape), 1))
    if sigma == 0:
        return grid.expand(batch_size, *grid.shape[1:])
    noise = torch.randn((batch_size, *grid.shape[1:]), device=device, dtype=dtype)
    return grid + noise * (sigma * voxel_size(shape, grid))


def resolve_shape(phi: Map | torch.Tensor, shape: Sequence[int] | None) -> tuple[int, ...]:
    """The evaluation grid: ``shape`` if given, else the spatial shape of a DDF tensor ``phi``."""
    if shape is not None:
        return tuple(int(s) for s in shape)
    if isinstance(phi, torch.Tensor):
        return tuple(phi.shape[2:])
    raise ValueError("shape is required when the maps are Map objects (pass the image's spatial shape).")


def inverse_consistency(
    phi_AB: Map | torch.Tensor,
    phi_BA: Map | torch.Tensor,
    shape: Sequence[int] | None = None,
    sigma: float = 1.0,
    epsilon: float = 0.0,
    point_fraction: float = 1.0,
) -> torch.Tensor:
    """Per-pair inverse consistency error ``mean(e_AB^2) + mean(e_BA^2)``.

    ``e_AB(x) = phi_AB(phi_BA(x)) - x`` and ``e_BA(x) = phi_BA(phi_AB(x)) - x`` at points ``x`` drawn by
    :func:`sample_points`; each mean runs over the coordinate channels and the points, in ``[0, 1]`` units,
    so that the paper's lambda values carry over unchanged.

    Args:
        phi_AB, phi_BA: :class:`~monai_icon.networks.maps.Map` objects, or MONAI voxel DDFs ``[B, D, *N]``.
        shape: spatial shape of the evaluation grid (defaults to the DDF's shape when DDFs are given).
        sigma: standard deviation of the off-grid jitter in voxels per axis. Keep it > 0 for training: on-grid
            evaluation (``sigma = 0``) cannot see pixel swaps (paper Fig. 3/4).
        epsilon: approximate inverse consistency (Sec. 2.3): standard deviation, in voxels per axis, of white
            noise added to each map's output before composing; 0 disables it.
        point_fraction: evaluate at a random ``point_fraction`` of the jittered grid points (an unbiased estimate
            of the same mean at that fraction of the cost: the regulariser's samplings dominate a 3D CPU step).

    Returns:
        ``[B]`` tensor, differentiable with respect to both maps.
    """
    shape = resolve_shape(phi_AB, shape)
    phi_AB, phi_BA = as_map(phi_AB), as_map(phi_BA)
    if phi_AB.spatial_dims != len(shape) or phi_BA.spatial_dims != len(shape):
        raise ValueError(f"maps of dimension {phi_AB.spatial_dims}/{phi_BA.spatial_dims} and a grid {shape} differ.")
    error_AB = _round_trip_error(phi_AB, phi_BA, shape, sigma, epsilon, point_fraction)  # phi_AB(phi_BA(x)) - x
    return error_AB + _round_trip_error(phi_BA, phi_AB, shape, sigma, epsilon, point_fraction)


def _round_trip_error(
    outer: Map, inner: Map, shape: tuple[int, ...], sigma: float, epsilon: float, fraction: float = 1.0
) -> torch.Tensor:
    """``mean((outer(inner(x)) - x)^2)`` per pair, ``[B]``, at fresh jittered points ``x``.

    A function of its own so that its full-size points and maps are freed when it returns (only what autograd
    saves stays): the second direction's evaluation then does not run beside the first one's intermediates.
    """
    batch = outer.batch_size
    x = sample_points(shape, batch, sigma, outer.device, outer.dtype, fraction)
    y = inner(x)
    if epsilon:
        y = y + torch.randn_like(y) * (epsilon * voxel_size(shape, y))
    z = outer(y)
    if epsilon:
        z = z + torch.randn_like(z) * (epsilon * voxel_size(shape, z))
    return (z - x).pow(2).reshape(batch, -1).mean(dim=1)


class InverseConsistencyLoss(_Loss):
    """The ICON regulariser as a loss module; see :func:`inverse_consistency`.

    Args:
        sigma: off-grid jitter in voxels per axis (default one voxel, as in the paper).
        epsilon: approximate inverse consistency noise in voxels per axis (0: off).
        point_fraction: fraction of the (jittered) grid points evaluated, drawn at random each call (1: all).
        reduction: ``"mean"`` | ``"sum"`` over pairs, or ``"none"`` for ``[B]``.

    ``forward(phi_AB, phi_BA, shape=None)`` takes two maps (or two voxel DDFs) and the spatial shape of the grid
    on which to evaluate. The module holds no state beyond its hyper-parameters.
    """

    def __init__(
        self, sigma: float = 1.0, epsilon: float = 0.0, reduction: LossReduction | str = LossReduction.MEAN,
        point_fraction: float = 1.0,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if sigma < 0 or epsilon < 0:
            raise ValueError(f"sigma and epsilon must be >= 0, got {sigma} and {epsilon}.")
        if not 0.0 < point_fraction <= 1.0:
            raise ValueError(f"point_fraction must lie in (0, 1], got {point_fraction}.")
        self.sigma = float(sigma)
        self.epsilon = float(epsilon)
        self.point_fraction = float(point_fraction)

    def forward(
        self, phi_AB: Map | torch.Tensor, phi_BA: Map | torch.Tensor, shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        return reduce(
            inverse_consistency(phi_AB, phi_BA, shape, self.sigma, self.epsilon, self.point_fraction), self.reduction
        )
