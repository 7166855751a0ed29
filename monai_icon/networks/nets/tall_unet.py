# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""``TallUNet``: the U-Net of the published ICON / GradICON / uniGradICON models (the reference's ``tallUNet2``,
and the ``UNet2ChunkyMiddle`` variant of the first ICON OAI step), written for this project so that their
weights load by parameter name and shape (see :mod:`monai_icon.networks.pretrained`).

Architecture (5 levels, channels ``(2C, 16, 32, 64, 256, 512)`` down and ``(16, 32, 64, 128, 256)`` up):

* down level ``d``: ``x <- conv_s2(leaky_relu(x)) + channel_fit(avg_pool_2(x))`` (3x3 stride-2 convolution;
  the pooled input is cut to, or zero-padded in front to, the output's channel count);
* up level ``d`` (deepest first): ``x <- batch_norm(conv_transpose_s2(leaky_relu(x)) + upsample_2(channel_fit(x)))``
  (4x4 stride-2 transposed convolution, linear upsampling with ``align_corners=False``), cropped to the skip's
  size and concatenated with it;
* output: ``conv3x3(x) / 10``, zero-initialised: a displacement in ``[0, 1]`` units that starts at zero.

The ``chunky_middle`` variant passes the bottleneck through two dense layers; it only works for inputs whose
bottleneck is ``2 x 3 x 3`` (3D inputs of 40 x 96 x 96, the ICON OAI model's quarter resolution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm

from monai_icon.networks.nets._utils import concat_pair, in_weight_format

__all__ = ["TallUNet"]

_CHUNKY_BOTTLENECK = (512, 2, 3, 3)


def _fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or zero-pad in front up to ``channels``."""
    if x.shape[1] >= channels:
        return x[:, :channels]
    return torch.cat([x.new_zeros(x.shape[0], channels - x.shape[1], *x.shape[2:]), x], dim=1)


class TallUNet(nn.Module):
    """The published ICON-family U-Net (module docstring); attribute names follow the published weights
    (``downConvs``, ``upConvs``, ``batchNorms``, ``lastConv``, ``middle_dense``).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of one image (the pair has twice as many).
        down_channels: output channels of the down levels (paper models: ``(16, 32, 64, 256, 512)``).
        up_channels: output channels of the up levels, same length (``(16, 32, 64, 128, 256)``).
        chunky_middle: the ICON OAI first step's dense bottleneck (3D, 40 x 96 x 96 inputs only).

    Shapes:
        ``(image_A, image_B)`` each ``[B, in_channels, *N]`` (or one ``[B, 2 * in_channels, *N]`` tensor) ->
        ``[B, spatial_dims, *N]`` displacement in ``[0, 1]`` units.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        down_channels: Sequence[int] = (16, 32, 64, 256, 512),
        up_channels: Sequence[int] = (16, 32, 64, 128, 256),
        chunky_middle: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(down_channels) != len(up_channels) or not down_channels:
            raise ValueError(
                f"down_channels and up_channels need the same non-zero length, got {down_channels} and {up_channels}."
            )
        if chunky_middle and (spatial_dims != 3 or down_channels[-1] != _CHUNKY_BOTTLENECK[0]):
            raise ValueError(
                "chunky_middle is the ICON OAI 3D bottleneck: needs spatial_dims 3 and 512 deepest channels."
            )
        self.spatial_dims, self.in_channels, self.chunky_middle = spatial_dims, in_channels, chunky_middle
        down = [2 * in_channels, *down_channels]
        up_in = [d + u for d, u in zip(down[1:], [*up_channels[1:], 0])]
        conv, conv_t, norm = (
            Conv[Conv.CONV, spatial_dims],
            Conv[Conv.CONVTRANS, spatial_dims],
            Norm[Norm.BATCH, spatial_dims],
        )
        self.downConvs = nn.ModuleList(
            [conv(down[d], down[d + 1], kernel_size=3, padding=1, stride=2) for d in range(len(down_channels))]
        )
        self.upConvs = nn.ModuleList(
            [conv_t(up_in[d], up_channels[d], kernel_size=4, padding=1, stride=2) for d in range(len(up_channels))]
        )
        self.batchNorms = nn.ModuleList([norm(c) for c in up_channels])
        self.lastConv = conv(down[0] + up_channels[0], spatial_dims, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        if chunky_middle:
            width = math.prod(_CHUNKY_BOTTLENECK)
            self.middle_dense = nn.ModuleList([nn.Linear(width, width // 4), nn.Linear(width // 4, width)])
        else:
            nn.init.zeros_(self.lastConv.bias)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor | None = None) -> torch.Tensor:
        x = in_weight_format(concat_pair(image_A, image_B, self.spatial_dims, 2 * self.in_channels),
                             self.downConvs[0])
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        skips = []
        for down in self.downConvs:
            skips.append(x)
            y = down(F.leaky_relu(x))
            x = y + _fit_channels(pool(x, 2, ceil_mode=True), y.shape[1])
        if self.chunky_middle:
            if tuple(x.shape[1:]) != _CHUNKY_BOTTLENECK:
                raise ValueError(
                    f"the chunky-middle U-Net needs a {_CHUNKY_BOTTLENECK} bottleneck (inputs 40 x 96 x 96), "
                    f"got {tuple(x.shape[1:])} from inputs {tuple(skips[0].shape[2:])}."
                )
            flat = self.middle_dense[1](F.leaky_relu(self.middle_dense[0](x.reshape(x.shape[0], -1))))
            x = flat.reshape(x.shape)
        for depth in reversed(range(len(self.upConvs))):
            y = self.upConvs[depth](F.leaky_relu(x))
            x = y + F.interpolate(_fit_channels(x, y.shape[1]), scale_factor=2, mode=mode, align_corners=False)
            x = self.batchNorms[depth](x)
            skip = skips[depth]
            x = x[(slice(None), slice(None), *[slice(0, n) for n in skip.shape[2:]])]
            x = torch.cat([x, skip], dim=1)
        return self.lastConv(x) / 10
