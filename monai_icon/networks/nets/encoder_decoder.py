# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's encoder-decoder network (supplement 2.2): a U-Net without skip connections."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers import Conv

from monai_icon.networks.nets._utils import (
    check_unet_args, concat_pair, crop_to, in_weight_format, pad_to_multiple, zero_init,
)

__all__ = ["EncoderDecoder"]


class EncoderDecoder(nn.Module):
    """Stride-2 convolutions (kernel 3) down, stride-2 transposed convolutions (kernel 4) up, ReLU after each,
    then a zero-initialised 3-kernel convolution to the displacement.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated pair.
        encoder_channels: paper ``(16, 32, 64, 256, 512)``.
        decoder_channels: paper ``(256, 128, 64, 32, 16)``; same length as ``encoder_channels``.

    Shapes:
        ``[B, in_channels, *N]`` (or two images) -> ``[B, spatial_dims, *N]`` displacement in ``[0, 1]`` units.
        Any ``N`` works: inputs are replicate-padded to a multiple of ``2 ** len(encoder_channels)`` (32 for the
        paper's sizes) and the output is cropped back.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        encoder_channels: Sequence[int] = (16, 32, 64, 256, 512),
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        check_unet_args(spatial_dims, encoder_channels, decoder_channels)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.multiple = 2 ** len(encoder_channels)
        conv, convt = Conv[Conv.CONV, spatial_dims], Conv[Conv.CONVTRANS, spatial_dims]
        layers: list[nn.Module] = []
        width = in_channels
        for c in encoder_channels:
            layers += [conv(width, c, 3, stride=2, padding=1), nn.ReLU()]
            width = c
        for c in decoder_channels:
            layers += [convt(width, c, 4, stride=2, padding=1), nn.ReLU()]
            width = c
        layers.append(zero_init(conv(width, spatial_dims, 3, padding=1)))
        self.layers = nn.Sequential(*layers)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor | None = None) -> torch.Tensor:
        x = concat_pair(image_A, image_B, self.spatial_dims, self.in_channels)
        y = self.layers(in_weight_format(pad_to_multiple(x, self.multiple), self.layers[0]))
        return crop_to(y, x.shape[2:])
