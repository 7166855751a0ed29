# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The diffusion regulariser of a displacement field, ``sum_d mean((n_d (u[i + e_d] - u[i]))^2)``, with its gradient
in closed form: the regulariser of the one-way refinement
(:func:`~monai_icon.engines.instance_optimisation.refine_one_way`).

Autograd through ``torch.diff(...).pow(2).mean()`` takes about a dozen passes over the field per axis (the
difference, the power, the mean and their backward functions, each a full-size temporary); the closed form needs
the differences once forward and once backward, added into one gradient buffer in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

__all__ = ["diffusion_energy"]


class _DiffusionEnergy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, field: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(field)
        ctx.scales = scales
        total = field.new_zeros(())
        for axis, scale in enumerate(scales):
            total = total + torch.diff(field, dim=axis + 2).square().mean() * (scale * scale)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (field,) = ctx.saved_tensors
        out = torch.zeros_like(field)
        for axis, scale in enumerate(ctx.scales):
            difference = torch.diff(field, dim=axis + 2)
            difference.mul_(grad * (2.0 * scale * scale / difference.numel()))
            size = field.shape[axis + 2]
            out.narrow(axis + 2, 1, size - 1).add_(difference)
            out.narrow(axis + 2, 0, size - 1).sub_(difference)
        return out, None


def diffusion_energy(field: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """``sum_d mean((scales[d] * diff(field, axis d))^2)`` over the spatial axes of ``field`` (forward differences,
    the mean over all of the batch, channels and differences of an axis), differentiable once with respect to
    ``field``.

    Args:
        field: ``[B, C, *N]`` (e.g. a displacement field in ``[0, 1]`` units), every ``N_d >= 2``.
        scales: one factor per spatial axis (e.g. ``N_d - 1``: differences per unit of the grid, i.e. the gradient
            in ``[0, 1]`` units).

    Returns:
        a 0-dim tensor: the values of ``sum(((torch.diff(field, dim=2 + d) * scales[d]) ** 2).mean())`` up to
        float rounding.

    Raises:
        ValueError: not one scale per spatial axis, or a spatial axis with fewer than 2 voxels.
    """
    scales = tuple(float(s) for s in scales)
    if field.ndim < 3 or len(scales) != field.ndim - 2:
        raise ValueError(f"diffusion_energy needs [B, C, *N] and one scale per spatial axis, got a field of shape "
                         f"{tuple(field.shape)} and {len(scales)} scales.")
    if min(field.shape[2:]) < 2:
        raise ValueError(f"diffusion_energy needs at least 2 voxels along every axis, got {tuple(field.shape[2:])}.")
    return _DiffusionEnergy.apply(field, scales)
