# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Displacement networks of the ICON paper (supplement 2): each maps a moving/fixed pair to a displacement
``[B, spatial_dims, *N]`` in ``[0, 1]`` units, with a zero-initialised output layer."""

from monai_icon.networks.nets.affine import AffineNet
from monai_icon.networks.nets.conv_only import ConvOnly
from monai_icon.networks.nets.encoder_decoder import EncoderDecoder
from monai_icon.networks.nets.mlp import MLP
from monai_icon.networks.nets.tall_unet import TallUNet
from monai_icon.networks.nets.unet import UNet, unet_padding

__all__ = ["MLP", "EncoderDecoder", "ConvOnly", "UNet", "AffineNet", "TallUNet", "unet_padding"]
