# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""A small convolutional network predicting an affine matrix, for :class:`monai_icon.networks.blocks.Affine`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import Conv

from monai_icon.networks.nets._utils import concat_pair, zero_init

__all__ = ["AffineNet"]


class AffineNet(nn.Module):
    """Stride-2 convolutions with ReLU, global average pooling and a zero-initialised linear head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated pair.
        channels: widths of the stride-2 convolutions.

    Shapes:
        ``[B, in_channels, *N]`` (or two images) -> ``[B, spatial_dims, spatial_dims + 1]``: offsets from the
        identity matrix ``[I | 0]`` in ``[0, 1]`` coordinates (zero at initialisation). Any ``N``.
    """

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 2, channels: Sequence[int] = (16, 32, 64, 128)
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        conv = Conv[Conv.CONV, spatial_dims]
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [conv(width, c, 3, stride=2, padding=1), nn.ReLU()]
            width = c
        self.features = nn.Sequential(*layers)
        self.head = zero_init(nn.Linear(width, spatial_dims * (spatial_dims + 1)))

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor | None = None) -> torch.Tensor:
        x = concat_pair(image_A, image_B, self.spatial_dims, self.in_channels)
        pooled = self.features(x).flatten(2).mean(-1)
        return self.head(pooled).reshape(x.shape[0], self.spatial_dims, self.spatial_dims + 1)
