# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's MLP displacement network (supplement 2.1)."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import torch.nn as nn

from monai_icon.networks.nets._utils import concat_pair, zero_init

__all__ = ["MLP"]


class MLP(nn.Module):
    """Multilayer perceptron: the flattened pair goes through hidden layers (ReLU) to a displacement grid.

    Args:
        spatial_dims: 2 or 3.
        image_size: spatial size of the inputs (fixed by construction: an MLP has no spatial weight sharing).
        in_channels: channels of the concatenated pair (2 for two single-channel images).
        hidden_channels: hidden layer widths; the paper uses ``(8000, 3000)``.

    Shapes:
        ``forward(image_A, image_B)`` with ``[B, C, *image_size]`` images (or one ``[B, in_channels, *image_size]``
        tensor) returns ``[B, spatial_dims, *image_size]``, a displacement in ``[0, 1]`` units. The output layer
        is zero-initialised.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        image_size: Sequence[int] = (28, 28),
        in_channels: int = 2,
        hidden_channels: Sequence[int] = (8000, 3000),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3) or len(image_size) != spatial_dims:
            raise ValueError(f"spatial_dims must be 2 or 3 and match image_size, got {spatial_dims} and {image_size}.")
        self.spatial_dims = spatial_dims
        self.image_size = tuple(int(s) for s in image_size)
        self.in_channels = in_channels
        voxels = prod(self.image_size)
        layers: list[nn.Module] = []
        width = in_channels * voxels
        for hidden in hidden_channels:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(zero_init(nn.Linear(width, spatial_dims * voxels)))
        self.layers = nn.Sequential(*layers)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor | None = None) -> torch.Tensor:
        x = concat_pair(image_A, image_B, self.spatial_dims, self.in_channels)
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"this MLP was built for images of size {self.image_size}, got {tuple(x.shape[2:])}.")
        out = self.layers(x.flatten(1))
        return out.reshape(x.shape[0], self.spatial_dims, *self.image_size)
