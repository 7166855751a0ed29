# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's ConvOnly network (supplement 2.3): densely connected convolutions, no resampling."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv

from monai_icon.networks.nets._utils import concat_pair, in_weight_format, zero_init

__all__ = ["ConvOnly"]


class ConvOnly(nn.Module):
    """Six convolutional layers without down- or up-sampling; each layer sees the concatenation of the input
    and the outputs of all previous layers.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated pair.
        features: output features of each hidden layer (paper: 10).
        num_layers: number of convolutional layers including the output layer (paper: 6).
        kernel_size: odd kernel size (paper: 5); 'same' zero padding keeps the grid.

    Shapes:
        ``[B, in_channels, *N]`` (or two images) -> ``[B, spatial_dims, *N]`` displacement in ``[0, 1]`` units,
        any ``N``. The output layer is zero-initialised.
    """

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 2, features: int = 10, num_layers: int = 6, kernel_size: int = 5
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if kernel_size % 2 == 0 or num_layers < 1:
            raise ValueError(f"kernel_size must be odd and num_layers >= 1, got {kernel_size} and {num_layers}.")
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        conv = Conv[Conv.CONV, spatial_dims]
        pad = kernel_size // 2
        self.hidden = nn.ModuleList(
            conv(in_channels + features * i, features, kernel_size, padding=pad) for i in range(num_layers - 1)
        )
        self.out = zero_init(conv(in_channels + features * (num_layers - 1), spatial_dims, kernel_size, padding=pad))

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor | None = None) -> torch.Tensor:
        x = in_weight_format(concat_pair(image_A, image_B, self.spatial_dims, self.in_channels), self.out)
        for layer in self.hidden:
            x = torch.cat([x, F.relu(layer(x))], dim=1)
        return self.out(x)
