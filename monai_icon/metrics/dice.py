# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Dice of thresholded intensities, the paper's measure for the 2D digit and shape data (Sec. 4.4)."""

from __future__ import annotations

import torch
from monai.metrics import compute_dice

__all__ = ["threshold_dice"]


def threshold_dice(warped: torch.Tensor, fixed: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice of the masks ``warped > threshold`` and ``fixed > threshold`` per image.

    Args:
        warped: ``[B, 1, *N]`` warped moving image.
        fixed: ``[B, 1, *N]`` fixed image.
        threshold: intensity threshold (the paper: 0.5).

    Returns:
        ``[B]`` Dice values (1 where both masks are empty), computed by ``monai.metrics.compute_dice``.
    """
    if warped.shape != fixed.shape or warped.ndim not in (4, 5) or warped.shape[1] != 1:
        raise ValueError(
            f"warped and fixed must both be [B, 1, *spatial] of the same shape, got {tuple(warped.shape)} "
            f"and {tuple(fixed.shape)}."
        )
    pred = (warped > threshold).float()
    target = (fixed > threshold).float()
    return compute_dice(pred, target, include_background=True, ignore_empty=False)[:, 0]
