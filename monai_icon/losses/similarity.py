# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Image similarity losses by name (MSE, MONAI's LNCC and mutual information) and per-pair reduction."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from torch.nn.modules.loss import _Loss

__all__ = ["SIMILARITIES", "get_similarity", "per_pair"]

SIMILARITIES = ("mse", "lncc", "mi")


def get_similarity(name: str, spatial_dims: int = 2, **kwargs: Any) -> _Loss:
    """Build an image similarity loss with ``reduction="none"`` (per-voxel or per-pair values).

    Args:
        name: ``"mse"`` (``torch.nn.MSELoss``, the paper's choice), ``"lncc"``
            (``monai.losses.LocalNormalizedCrossCorrelationLoss``, best value -1; default here
            ``kernel_size=7``) or ``"mi"`` (``monai.losses.GlobalMutualInformationLoss``, negative MI).
        spatial_dims: 2 or 3 (used by LNCC).
        kwargs: passed to the loss constructor.

    Raises:
        ValueError: unknown name.
    """
    key = str(name).lower()
    if key == "mse":
        return torch.nn.MSELoss(reduction="none", **kwargs)
    if key == "lncc":
        kwargs.setdefault("kernel_size", 7)
        return LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, reduction="none", **kwargs)
    if key == "mi":
        return GlobalMutualInformationLoss(reduction="none", **kwargs)
    raise ValueError(f"unknown similarity {name!r}; choose one of {SIMILARITIES} or pass a loss module.")


def per_pair(value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Reduce a loss value computed with ``reduction="none"`` to one value per pair: ``[B]``.

    A value whose first axis is the batch is averaged over its other axes. A scalar (a loss built with a
    reducing ``reduction``) is broadcast to ``[B]``; it then carries no per-pair information.
    """
    if value.ndim == 0:
        return value.expand(batch_size)
    if value.shape[0] != batch_size:
        raise ValueError(f"expected a loss value with batch size {batch_size} first, got shape {tuple(value.shape)}.")
    return value.reshape(batch_size, -1).mean(dim=1)
