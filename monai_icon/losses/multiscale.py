# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""A similarity taken at several resolutions of the same pair (average pooling)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_icon.losses._reduction import reduce
from monai_icon.losses.similarity import per_pair

__all__ = ["MultiScaleSimilarity"]


class MultiScaleSimilarity(_Loss):
    """``sum_k w_k * similarity(pool_k(pred), pool_k(target))`` with ``pool_k`` the average pooling by ``factors[k]``
    (1: the images themselves).

    A local similarity (LNCC with a small window) on fine images gives a gradient only where the images already
    nearly overlap; the same window on pooled images reaches further. One value per pair.

    Args:
        similarity: a per-voxel or per-pair similarity loss built with ``reduction="none"``
            (:func:`~monai_icon.losses.get_similarity`).
        factors: pooling factors, integers >= 1 (the images' size need not be divisible: the remainder is dropped).
        weights: one per factor (default: all 1).
        reduction: ``"none"`` (``[B]``, what :class:`~monai_icon.losses.ICONLoss` expects), ``"mean"`` or ``"sum"``.
    """

    def __init__(self, similarity: _Loss, factors: Sequence[int] = (1, 2, 4), weights: Sequence[float] | None = None,
                 reduction: str = "none") -> None:
        super().__init__(reduction=reduction)
        reduce(torch.zeros(1), reduction)
        factors = tuple(int(f) for f in factors)
        if not factors or any(f < 1 for f in factors):
            raise ValueError(f"factors must be integers >= 1, got {factors}.")
        weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(factors)))
        if len(weights) != len(factors) or any(not w >= 0 for w in weights):
            raise ValueError(f"weights must be {len(factors)} values >= 0 (one per factor), got {weights}.")
        self.similarity, self.factors, self.weights = similarity, factors, weights

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Args: images ``[B, C, *N]`` (2D or 3D). Returns ``[B]`` (``"none"``) or a scalar."""
        if pred.shape != target.shape or pred.ndim not in (4, 5):
            raise ValueError(f"pred and target must be 2D or 3D batches [B, C, *N] of one shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}.")
        pool = F.avg_pool2d if pred.ndim == 4 else F.avg_pool3d
        total = torch.zeros(pred.shape[0], device=pred.device, dtype=pred.dtype)
        for factor, weight in zip(self.factors, self.weights):
            if factor > 1 and min(pred.shape[2:]) < factor:
                raise ValueError(f"images of size {tuple(pred.shape[2:])} cannot be pooled by {factor}.")
            a, b = (pred, target) if factor == 1 else (pool(pred, factor), pool(target, factor))
            total = total + weight * per_pair(self.similarity(a, b), pred.shape[0])
        return reduce(total, self.reduction)
