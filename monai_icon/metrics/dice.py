# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Dice of thresholded intensities, the paper's measure for the 2D digit and shape data (Sec. 4.4), and Dice per
label of two integer label maps on one grid (registration of labelled volumes)."""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, compute_dice
from monai.utils import MetricReduction

__all__ = ["threshold_dice", "ThresholdDiceMetric", "label_dice"]


def _check_pair(warped: torch.Tensor, fixed: torch.Tensor) -> None:
    if warped.shape != fixed.shape or warped.ndim not in (4, 5) or warped.shape[1] != 1:
        raise ValueError(
            f"warped and fixed must both be [B, 1, *spatial] of the same shape, got {tuple(warped.shape)} "
            f"and {tuple(fixed.shape)}."
        )


def threshold_dice(warped: torch.Tensor, fixed: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice of the masks ``warped > threshold`` and ``fixed > threshold`` per image.

    Args:
        warped: ``[B, 1, *N]`` warped moving image.
        fixed: ``[B, 1, *N]`` fixed image.
        threshold: intensity threshold (the paper: 0.5).

    Returns:
        ``[B]`` Dice values (1 where both masks are empty), computed by ``monai.metrics.compute_dice``.
    """
    _check_pair(warped, fixed)
    pred = (warped > threshold).float()
    target = (fixed > threshold).float()
    return compute_dice(pred, target, include_background=True, ignore_empty=False)[:, 0]


class ThresholdDiceMetric(DiceMetric):
    """``monai.metrics.DiceMetric`` on intensities thresholded at ``threshold`` (warped moving vs fixed image).

    ``metric(y_pred=warped, y=fixed)`` with ``[B, 1, *N]`` images returns ``[B, 1]``; ``aggregate()`` reduces
    the buffer (default mean). Pairs whose masks are both empty count as Dice 1.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(include_background=True, reduction=reduction, get_not_nans=get_not_nans, ignore_empty=False)
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _check_pair(y_pred, y)
        return super()._compute_tensor((y_pred > self.threshold).float(), (y > self.threshold).float())


def label_dice(warped_label: torch.Tensor, fixed_label: torch.Tensor,
               labels: list[int] | None = None) -> dict[int, float]:
    """Dice per label between two integer label maps on the same grid (e.g. moving labels warped onto the fixed
    image's grid, and the fixed labels), by ``monai.metrics.compute_dice`` on their one-hot encodings.

    Args:
        warped_label, fixed_label: integer label maps of one shape (any number of dimensions, no channel).
        labels: the labels to score (default: every nonzero label of ``fixed_label``).

    Returns:
        ``{label: dice}``; a label absent from both maps scores NaN, one absent from one map scores 0.

    Raises:
        ValueError: maps of different shapes, or non-integer values.
    """
    if warped_label.shape != fixed_label.shape:
        raise ValueError(f"label grids differ: {tuple(warped_label.shape)} vs {tuple(fixed_label.shape)}.")
    for name, value in (("warped_label", warped_label), ("fixed_label", fixed_label)):
        if value.is_floating_point() and not torch.equal(value, value.round()):
            raise ValueError(f"{name} must hold integer labels.")
    warped_label, fixed_label = warped_label.long(), fixed_label.long()
    if labels is None:
        labels = [int(v) for v in torch.unique(fixed_label) if v != 0]
    if not labels:
        return {}
    values = torch.tensor(labels, device=fixed_label.device).view(-1, *([1] * fixed_label.ndim))
    pred = (warped_label.unsqueeze(0) == values).float().unsqueeze(0)  # [1, L, *N] one-hot of the chosen labels
    target = (fixed_label.unsqueeze(0) == values).float().unsqueeze(0)
    dice = compute_dice(pred, target, include_background=True, ignore_empty=False)[0]
    empty = (pred.flatten(2).sum(-1) + target.flatten(2).sum(-1))[0] == 0
    return {k: float("nan") if bool(e) else float(d) for k, d, e in zip(labels, dice, empty)}
