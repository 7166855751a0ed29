# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Accumulate per-pair values an engine already computed (similarity, inverse consistency, time)."""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["ValueMetric"]


class ValueMetric(CumulativeIterationMetric):
    """Collect scalar values per pair and reduce them like any MONAI metric.

    ``metric(y_pred=values)`` with ``[B]`` (or ``[B, 1]``, or a decollated list of scalars) returns ``[B, 1]``;
    ``aggregate()`` reduces the buffer with ``reduction`` (default mean).
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        values = torch.as_tensor(y_pred, dtype=torch.float32)
        return values.reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> Any:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f
