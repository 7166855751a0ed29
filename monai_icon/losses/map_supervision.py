# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Supervision of a map by a known one (pairs made by :class:`~monai_icon.transforms.RandSelfPaird`)."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from monai_icon.losses._reduction import reduce
from monai_icon.networks.maps import identity_grid

__all__ = ["MapSupervisionLoss"]


class MapSupervisionLoss(_Loss):
    """Relative squared error of a map against a known map, per pair.

    ``sum_x |phi(x) - psi(x)|^2 / sum_x |psi(x) - x|^2`` with the differences in voxels of the grid the maps are
    sampled on (so every axis counts alike on non-cubic grids): 1 for the identity map, 0 for the exact one,
    whatever the deformation's size, so a weight of 1 puts it on the footing of a similarity loss of order 1. Pairs
    whose target is the identity (nothing to learn; e.g. weight 0 from ``RandSelfPaird``) contribute 0.

    Args:
        reduction: ``"mean"`` (over the pairs, those of weight 0 included), ``"sum"`` or ``"none"`` (``[B]``).
        epsilon: floor of the denominator (squared voxels per point).
    """

    def __init__(self, reduction: str = "mean", epsilon: float = 1e-6) -> None:
        super().__init__(reduction=reduction)
        reduce(torch.zeros(1), reduction)  # an unknown reduction fails here, not in the first step
        self.epsilon = float(epsilon)

    def forward(self, phi: torch.Tensor, target: torch.Tensor,  # type: ignore[override]
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ``phi`` and ``target``: ``[B, D, *N]`` maps in ``[0, 1]`` units on one grid of ``D`` dims;
        ``weight``: ``[B]`` per-pair weights (default 1). Returns the reduced loss (``[B]`` for ``"none"``)."""
        if phi.shape != target.shape or phi.ndim < 3 or phi.shape[1] != phi.ndim - 2:
            raise ValueError(f"phi and target must be maps [B, D, *N] of one shape with D = len(N), got "
                             f"{tuple(phi.shape)} and {tuple(target.shape)}.")
        if not bool(torch.isfinite(target).all()):
            raise ValueError("the target map has NaN or infinite values.")
        shape = phi.shape[2:]
        scale = torch.tensor([max(n - 1, 1) for n in shape], device=phi.device, dtype=phi.dtype)
        scale = scale.reshape(1, len(shape), *([1] * len(shape)))
        identity = identity_grid(shape, phi.device, phi.dtype)
        error = (((phi - target) * scale) ** 2).flatten(1).sum(1)
        size = (((target - identity) * scale) ** 2).flatten(1).sum(1)
        floor = self.epsilon * identity[0, 0].numel()
        per_pair = torch.where(size > floor, error / size.clamp_min(floor), torch.zeros_like(error))
        if weight is not None:
            if weight.shape != per_pair.shape:
                raise ValueError(f"weight must be [B] = {tuple(per_pair.shape)}, got {tuple(weight.shape)}.")
            per_pair = per_pair * weight.to(per_pair)
        return reduce(per_pair, self.reduction)
