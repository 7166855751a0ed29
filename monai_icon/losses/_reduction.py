# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""MONAI-style reduction of per-pair loss values."""

from __future__ import annotations

import torch
from monai.utils import LossReduction

__all__ = ["reduce"]


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``"mean"``, ``"sum"`` or ``"none"`` to per-pair values ``[B]``."""
    if reduction == LossReduction.MEAN.value:
        return values.mean()
    if reduction == LossReduction.SUM.value:
        return values.sum()
    if reduction == LossReduction.NONE.value:
        return values
    raise ValueError(f'unsupported reduction {reduction!r}, available options are ["mean", "sum", "none"].')
