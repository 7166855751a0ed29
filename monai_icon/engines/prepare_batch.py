# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Batch preparation for pairwise registration engines."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from monai_icon.engines.keys import RegKeys

__all__ = ["PrepareRegistrationBatch"]


class PrepareRegistrationBatch(PrepareBatch):
    """Pick the moving/fixed images (and optional labels) of a batch dictionary and move them to the device.

    Args:
        moving_key, fixed_key: image keys.
        moving_label_key, fixed_label_key: label keys; labels are returned when both are in the batch.

    Returns (call):
        ``(moving, fixed, moving_label, fixed_label)``, labels ``None`` when absent.

    Raises:
        ValueError: a missing image key or a moving/fixed shape mismatch (named in the message).
    """

    def __init__(
        self,
        moving_key: str = RegKeys.MOVING,
        fixed_key: str = RegKeys.FIXED,
        moving_label_key: str = RegKeys.MOVING_LABEL,
        fixed_label_key: str = RegKeys.FIXED_LABEL,
    ) -> None:
        self.keys = (moving_key, fixed_key, moving_label_key, fixed_label_key)

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        moving_key, fixed_key, moving_label_key, fixed_label_key = self.keys
        for key in (moving_key, fixed_key):
            if key not in batchdata:
                raise ValueError(f"the batch has no {key!r}; keys present: {sorted(batchdata)}.")

        def to(x: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(x).to(device=device, non_blocking=non_blocking, **kwargs)

        moving, fixed = to(batchdata[moving_key]), to(batchdata[fixed_key])
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving and fixed images of a pair must have the same shape (resample them to the network grid "
                f"first), got {tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        if moving_label_key in batchdata and fixed_label_key in batchdata:
            return moving, fixed, to(batchdata[moving_label_key]), to(batchdata[fixed_label_key])
        return moving, fixed, None, None
