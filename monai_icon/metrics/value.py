# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Accumulate per-pair values an engine already computed (similarity, inverse consistency, time)."""

from __future__ import annotations

import torch

from monai_icon.metrics._reduction import PerPairMetric

__all__ = ["ValueMetric"]


class ValueMetric(PerPairMetric):
    """Collect scalar values per pair and reduce them like any MONAI metric.

    ``metric(y_pred=values)`` with ``[B]`` (or ``[B, 1]``, or a decollated list of scalars) returns ``[B, 1]``;
    ``aggregate()`` reduces the buffer with ``reduction`` (default mean); ``get_not_nans`` as in MONAI metrics.
    """

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        values = torch.as_tensor(y_pred, dtype=torch.float32)
        return values.reshape(-1, 1)
