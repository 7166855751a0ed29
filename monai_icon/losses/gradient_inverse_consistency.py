# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""GradICON (Tian, Greer et al., CVPR 2023): penalise the Jacobian of ``phi_AB o phi_BA - Id``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_icon.losses._reduction import reduce
from monai_icon.losses.inverse_consistency import resolve_shape, sample_points
from monai_icon.networks.maps import Map, as_map

__all__ = ["gradient_inverse_consistency", "GradientInverseConsistencyLoss"]


def gradient_inverse_consistency(
    phi_AB: Map | torch.Tensor,
    phi_BA: Map | torch.Tensor,
    shape: Sequence[int] | None = None,
    sigma: float = 1.0,
    delta: float = 1e-3,
    point_fraction: float = 1.0,
) -> torch.Tensor:
    """Per-pair GradICON penalty ``sum_d mean(((e(x + delta u_d) - e(x)) / delta)^2)``.

    ``e(x) = phi_AB(phi_BA(x)) - x`` (one direction only), ``u_d`` the unit vector of axis ``d``, forward finite
    differences with step ``delta`` in ``[0, 1]`` units, means over coordinate channels and points ``x`` drawn by
    :func:`~monai_icon.losses.inverse_consistency.sample_points` (``sigma`` voxels of jitter).

    Args:
        point_fraction: in ``(0, 1]``; below 1, the mean runs over a random ``point_fraction`` of the jittered
            grid points, drawn afresh each call (an unbiased estimate of the same mean at that fraction of the
            cost: each point costs ``D + 1`` evaluations of both maps, the most expensive samplings of a 3D CPU
            step).

    Returns:
        ``[B]`` tensor. For affine maps it equals ``||M_AB M_BA - I||_F^2 / D``.
    """
    shape = resolve_shape(phi_AB, shape)
    phi_AB, phi_BA = as_map(phi_AB), as_map(phi_BA)
    dims, batch = len(shape), phi_AB.batch_size
    if phi_AB.spatial_dims != dims or phi_BA.spatial_dims != dims:
        raise ValueError(f"maps of dimension {phi_AB.spatial_dims}/{phi_BA.spatial_dims} and a grid {shape} differ.")
    x = sample_points(shape, batch, sigma, phi_AB.device, phi_AB.dtype, point_fraction)  # [B, D, *shape or M]
    point_axes = x.ndim - 2
    # x and its D shifted copies as one batch of points [B, D, D + 1, ...]: one evaluation of the maps.
    shifts = torch.eye(dims, device=x.device, dtype=x.dtype) * delta
    shifts = torch.cat([torch.zeros_like(shifts[:1]), shifts], 0).T.reshape(1, dims, dims + 1, *([1] * point_axes))
    points = x.unsqueeze(2) + shifts
    error = phi_AB(phi_BA(points)) - points
    jacobian = (error[:, :, 1:] - error[:, :, :1]) / delta  # [B, D (component), D (direction), *shape]
    return jacobian.pow(2).mean(dim=1).reshape(batch, dims, -1).mean(dim=2).sum(dim=1)


class GradientInverseConsistencyLoss(_Loss):
    """GradICON regulariser as a loss module; see :func:`gradient_inverse_consistency`.

    Args:
        sigma: off-grid jitter of the sample points in voxels per axis.
        delta: finite-difference step in ``[0, 1]`` units (published value 1e-3).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` over pairs.
        point_fraction: fraction of the (jittered) grid points evaluated, drawn at random each call (1: all).

    The published recipe pairs it with LNCC and ``lmbda = 1.5``.
    """

    def __init__(
        self,
        sigma: float = 1.0,
        delta: float = 1e-3,
        reduction: LossReduction | str = LossReduction.MEAN,
        point_fraction: float = 1.0,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if sigma < 0 or delta <= 0:
            raise ValueError(f"sigma must be >= 0 and delta > 0, got {sigma} and {delta}.")
        if not 0.0 < point_fraction <= 1.0:
            raise ValueError(f"point_fraction must lie in (0, 1], got {point_fraction}.")
        self.sigma = float(sigma)
        self.delta = float(delta)
        self.point_fraction = float(point_fraction)

    def forward(
        self, phi_AB: Map | torch.Tensor, phi_BA: Map | torch.Tensor, shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        value = gradient_inverse_consistency(phi_AB, phi_BA, shape, self.sigma, self.delta, self.point_fraction)
        return reduce(value, self.reduction)
