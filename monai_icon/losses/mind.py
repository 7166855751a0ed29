# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""MIND-SSC: the modality independent neighbourhood descriptor with self-similarity context (Heinrich et al.,
MICCAI 2013), and a similarity loss comparing the descriptors of two images.

For every voxel, patch distances between pairs of its 2D four- / 3D six-neighbours that are ``sqrt(2)`` (times
the dilation) apart (4 pairs in 2D, 12 in 3D) are turned into ``exp(-distance / local variance)``: a vector that
describes local structure, not intensities, so a T1-like image and its T2-like (inverted) counterpart get the
same descriptor where the anatomy is the same.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["mind_ssc", "MINDSSCLoss"]


def _shift(x: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """``x`` sampled at ``index + offset`` (replicate padding at the borders), same shape."""
    dims = len(offset)
    r = max(abs(o) for o in offset) or 1
    padded = F.pad(x, [r] * (2 * dims), mode="replicate")
    index = tuple(slice(r + o, r + o + n) for o, n in zip(offset, x.shape[2:]))
    return padded[(slice(None), slice(None), *index)]


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a ``(2 radius + 1)`` box around each voxel (replicate padding)."""
    if radius == 0:
        return x
    dims = x.ndim - 2
    padded = F.pad(x, [radius] * (2 * dims), mode="replicate")
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    return pool(padded, 2 * radius + 1, stride=1)


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor of ``image`` ``[B, 1, *N]`` (2D or 3D).

    Args:
        radius: patch radius of the distances (box filter), voxels.
        dilation: spacing of the neighbours, voxels.

    Returns:
        ``[B, K, *N]`` descriptor in ``(0, 1]`` (``K`` = 4 in 2D, 12 in 3D), each voxel's maximum scaled to 1.
    """
    if image.ndim not in (4, 5) or image.shape[1] != 1:
        raise ValueError(f"expected a single-channel image [B, 1, H, W(, D)], got shape {tuple(image.shape)}.")
    if radius < 0 or dilation < 1:
        raise ValueError(f"radius must be >= 0 and dilation >= 1, got {radius} and {dilation}.")
    dims = image.ndim - 2
    neighbours = []
    for axis, sign in itertools.product(range(dims), (1, -1)):
        offset = [0] * dims
        offset[axis] = sign * dilation
        neighbours.append(tuple(offset))
    # pairs of neighbours on different axes: sqrt(2) * dilation apart (opposite neighbours are excluded)
    pairs = [(a, b) for a, b in itertools.combinations(neighbours, 2)
             if sum((x - y) ** 2 for x, y in zip(a, b)) == 2 * dilation ** 2]
    shifted = {n: _shift(image, n) for n in neighbours}
    distances = torch.cat([_box((shifted[a] - shifted[b]) ** 2, radius) for a, b in pairs], dim=1)
    variance = distances.mean(dim=1, keepdim=True)
    mean = variance.mean(dim=tuple(range(1, variance.ndim)), keepdim=True)
    variance = torch.minimum(torch.maximum(variance, 1e-3 * mean), 1e3 * mean).clamp(min=1e-12)
    descriptor = torch.exp(-distances / variance)
    return descriptor / descriptor.amax(dim=1, keepdim=True).clamp(min=1e-12)


class MINDSSCLoss(_Loss):
    """Mean squared difference of the MIND-SSC descriptors of ``pred`` and ``target`` (0 = same structure),
    a multimodal similarity that is not mutual information; usable by name (``similarity: mind``).

    Args:
        spatial_dims: 2 or 3 (inputs of another dimension are rejected).
        radius, dilation: see :func:`mind_ssc`.
        reduction: ``"mean"`` | ``"sum"`` over all elements, or ``"none"`` for ``[B, K, *N]`` values.

    ``forward(pred, target)``: ``[B, 1, *N]`` each.
    """

    def __init__(self, spatial_dims: int = 3, radius: int = 1, dilation: int = 2,
                 reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims, self.radius, self.dilation = spatial_dims, radius, dilation

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if pred.shape != target.shape:
            raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                             f"{tuple(target.shape)}.")
        if pred.ndim - 2 != self.spatial_dims:
            raise ValueError(f"this MINDSSCLoss is {self.spatial_dims}D, got shape {tuple(pred.shape)}.")
        diff = (mind_ssc(pred, self.radius, self.dilation) - mind_ssc(target, self.radius, self.dilation)) ** 2
        if self.reduction == LossReduction.MEAN.value:
            return diff.mean()
        if self.reduction == LossReduction.SUM.value:
            return diff.sum()
        return diff
