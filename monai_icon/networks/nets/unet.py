# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's U-Net (supplement 2.4): skip and residual connections, batch norm, leaky ReLU before each conv."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv, Norm

from monai_icon import backend
from monai_icon.networks.nets._utils import (
    check_unet_args,
    concat_pair,
    crop_to,
    in_weight_format,
    match_channels,
    pad_to_multiple,
    zero_init,
)

__all__ = ["UNet", "unet_padding"]


class _PreActivation(nn.Module):
    """``conv(leaky_relu(batch_norm(x)))`` plus a parameter-free residual resampled to the output grid."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, up: bool, negative_slope: float) -> None:
        super().__init__()
        self.norm = Norm[Norm.BATCH, spatial_dims](in_ch)
        if up:
            self.conv = Conv[Conv.CONVTRANS, spatial_dims](in_ch, out_ch, 4, stride=2, padding=1)
        else:
            self.conv = Conv[Conv.CONV, spatial_dims](in_ch, out_ch, 3, stride=2, padding=1)
        self.up, self.out_ch, self.negative_slope = up, out_ch, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.leaky_relu(self.norm(x), self.negative_slope))
        # channels truncated before the resampling and zero-padded after it (both commute with nearest upsampling
        # and average pooling, so the values are the same): no channel is resampled only to be dropped
        if x.shape[1] > self.out_ch:
            x = match_channels(x, self.out_ch)
        if self.up:
            shortcut = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # an odd size n (replicate-padded by one) gives ceil(n / 2), as the stride-2 convolution does
            shortcut = (F.avg_pool2d if x.ndim == 4 else F.avg_pool3d)(pad_to_multiple(x, 2), 2)
        return y + match_channels(shortcut, self.out_ch)


class UNet(nn.Module):
    """U-Net with the encoder-decoder's layer shapes, skip connections (encoder features concatenated into the
    decoder), a residual connection around every convolution, batch norm and leaky ReLU placed before each
    convolution, and a zero-initialised output convolution.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated pair.
        encoder_channels: paper ``(16, 32, 64, 256, 512)``.
        decoder_channels: paper ``(256, 128, 64, 32, 16)``; same length as ``encoder_channels``.
        negative_slope: of the leaky ReLU.
        pad_multiple: the input is replicate-padded to a multiple of this (default ``2 ** len(encoder_channels)``:
            every level halves exactly, as in training on such sizes). A smaller value saves the padded voxels on
            other sizes (a 48×56×48 grid is padded to 64×64×64 by default, 2.2 times its voxels, and to 48×64×48
            with 16); the maps near the far borders then differ somewhat. Settable after construction.

    Shapes:
        ``[B, in_channels, *N]`` (or two images) -> ``[B, spatial_dims, *N]`` displacement in ``[0, 1]`` units.
        Any ``N`` works: inputs are replicate-padded to a multiple of ``pad_multiple`` and the output is cropped
        back; a level whose size is odd (with ``pad_multiple < 2 ** len(encoder_channels)``) is halved rounding up
        and its decoder output cropped to the skip connection's size. In training mode batch norm needs more than
        one value per channel at the coarsest level (batch size > 1 when the padded size divided by
        ``2 ** depth`` is 1).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 2,
        encoder_channels: Sequence[int] = (16, 32, 64, 256, 512),
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        negative_slope: float = 0.01,
        pad_multiple: int | None = None,
    ) -> None:
        super().__init__()
        check_unet_args(spatial_dims, encoder_channels, decoder_channels)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.pad_multiple = 2 ** len(encoder_channels) if pad_multiple is None else pad_multiple
        skips = [in_channels, *encoder_channels[:-1]]  # feature widths concatenated back at each decoder level
        self.down = nn.ModuleList()
        width = in_channels
        for c in encoder_channels:
            self.down.append(_PreActivation(spatial_dims, width, c, up=False, negative_slope=negative_slope))
            width = c
        self.up = nn.ModuleList()
        for c, skip in zip(decoder_channels, reversed(skips)):
            self.up.append(_PreActivation(spatial_dims, width, c, up=True, negative_slope=negative_slope))
            width = c + skip
        self.out = zero_init(Conv[Conv.CONV, spatial_dims](width, spatial_dims, 3, padding=1))

    @property
    def pad_multiple(self) -> int:
        return self._pad_multiple

    @pad_multiple.setter
    def pad_multiple(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"pad_multiple must be a positive integer, got {value!r}.")
        self._pad_multiple = value

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor | None = None) -> torch.Tensor:
        x = concat_pair(image_A, image_B, self.spatial_dims, self.in_channels)
        size = x.shape[2:]
        x = in_weight_format(pad_to_multiple(x, self.pad_multiple), self.out)
        features = []
        for layer in self.down:
            features.append(x)
            x = layer(x)
        for level, layer in enumerate(self.up):
            skip = features.pop()
            if level == len(self.up) - 1:  # the last layer and the output convolution in one (CPU evaluation)
                last = cast(_PreActivation, layer)
                head = backend.unet_head(x, skip, last.norm, last.conv, last.negative_slope, self.out)
                if head is not None:
                    return crop_to(head, size)
            x = torch.cat([crop_to(layer(x), skip.shape[2:]), skip], dim=1)
        return crop_to(self.out(x), size)


@contextmanager
def unet_padding(network: nn.Module, pad_multiple: int) -> Iterator[nn.Module]:
    """Within this context every :class:`UNet` in ``network`` pads its input to a multiple of ``pad_multiple``
    (e.g. 1: no padding, odd levels rounded up); their own values are restored on exit.

    Raises:
        ValueError: ``pad_multiple`` not a positive integer.
    """
    unets = [m for m in network.modules() if isinstance(m, UNet)]
    saved = [u.pad_multiple for u in unets]
    try:
        for u in unets:
            u.pad_multiple = pad_multiple
        yield network
    finally:
        for u, value in zip(unets, saved):
            u.pad_multiple = value
