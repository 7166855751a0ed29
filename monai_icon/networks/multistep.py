# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's multi-step 3D model: U-Net steps composed at reduced and full resolution (Sec. 4.1, supplement).

Stage 1 trains ``Downsample(TwoStep(U-Net step, U-Net step), 2)`` (two steps at half resolution); stage 2 loads
it, freezes it and trains full-resolution steps composed after it:
``TwoStep(Frozen(stage 1), U-Net step)`` (optionally one more full-resolution step). Every stage is a
:class:`~monai_icon.networks.RegistrationNet` whose state-dict keys do not depend on whether the coarse part
is frozen, so the final model loads the same way for training, evaluation and inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from monai_icon.config import as_bool
from monai_icon.networks.blocks import DisplacementField, Downsample, Frozen, RegistrationModule, TwoStep
from monai_icon.networks.nets.unet import UNet
from monai_icon.networks.registration_net import RegistrationNet
from monai_icon.networks.weights import load_weights

__all__ = ["unet_step", "chain", "unet_registration", "multistep_registration"]


def unet_step(spatial_dims: int = 3, in_channels: int = 2, encoder_channels: Sequence[int] = (16, 32, 64, 256, 512),
              decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), sigma: float = 0.0) -> DisplacementField:
    """One displacement-field step with the paper's U-Net (zero-initialised output: starts at the identity);
    ``sigma > 0``: its displacement Gaussian-smoothed (voxels; :class:`DisplacementField`)."""
    return DisplacementField(UNet(spatial_dims, in_channels, encoder_channels, decoder_channels), sigma=sigma)


def chain(*blocks: RegistrationModule) -> RegistrationModule:
    """Compose steps left to right: ``chain(a, b, c) = TwoStep(TwoStep(a, b), c)``."""
    if not blocks:
        raise ValueError("chain needs at least one block.")
    out = blocks[0]
    for block in blocks[1:]:
        out = TwoStep(out, block)
    return out


def unet_registration(spatial_dims: int = 2, steps: int = 1, in_channels: int = 2,
                      encoder_channels: Sequence[int] = (16, 32, 64, 256, 512),
                      decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)) -> RegistrationNet:
    """The paper's U-Net registration network at full resolution: one :func:`unet_step` (``steps=1``: the
    paper's 2D network, state-dict keys ``block.net.*``) or ``steps`` of them composed (:func:`chain`; each step
    registers the previous steps' warped moving image to the fixed one; keys ``block.first.*``, ``block.second.*``
    for two). Every step starts at the identity, so does the chain.

    Raises:
        ValueError: ``steps`` not an integer >= 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    args = (spatial_dims, in_channels, encoder_channels, decoder_channels)
    return RegistrationNet(chain(*[unet_step(*args) for _ in range(steps)]))


def multistep_registration(
    spatial_dims: int = 3,
    in_channels: int = 2,
    coarse_steps: int = 2,
    coarse_factor: int = 2,
    fine_steps: int = 0,
    freeze_coarse: bool = True,
    coarse_weights: str | Path | None = None,
    encoder_channels: Sequence[int] = (16, 32, 64, 256, 512),
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    coarse_sigma: float = 0.0,
    resample_coarse: bool | str = False,
    coarse_pool: str = "average",
) -> RegistrationNet:
    """The multi-step model of the module docstring.

    Args:
        spatial_dims, in_channels, encoder_channels, decoder_channels: of every U-Net step.
        coarse_steps: U-Net steps composed at reduced resolution (the paper: 2).
        coarse_factor: their pooling factor (2 = half resolution; 1 = full resolution).
        fine_steps: full-resolution steps composed after them (0 for stage 1; 1 or 2 for stage 2).
        freeze_coarse: with ``fine_steps > 0``, keep the coarse steps fixed (:class:`Frozen`; the state-dict keys
            are the same either way).
        coarse_sigma: Gaussian smoothing (voxels of their grid) of the coarse steps' displacements (0: none), a
            smooth output head that conditions early training (:class:`DisplacementField`); no weights of its own.
        resample_coarse: the coarse steps' composed map sampled once on their grid and linearly interpolated
            (:class:`Downsample` ``resample``): cheaper to evaluate on a finer grid (a loss on the full-resolution
            images); a model trained with it must be run with it. Default ``False``: the exact composition. Config
            strings such as ``"true"`` are accepted (:func:`monai_icon.config.as_bool`).
        coarse_pool: how the coarse steps' inputs are made coarse (:class:`Downsample` ``pool``): ``"average"``
            (default, ``in_channels`` per step) or ``"unshuffle"`` (space-to-depth: the coarse steps' U-Nets take
            ``in_channels * coarse_factor^spatial_dims`` channels and see every fine voxel at the coarse cost).
        coarse_weights: a stage-1 checkpoint (a ``multistep_registration(fine_steps=0)`` model with the same
            arguments) loaded strictly into the coarse steps.

    Returns:
        a :class:`RegistrationNet`; its ``forward(cat([moving, fixed]))`` is the bundle's voxel-DDF interface.
    """
    if coarse_steps < 1 or fine_steps < 0:
        raise ValueError(f"need coarse_steps >= 1 and fine_steps >= 0, got {coarse_steps} and {fine_steps}.")
    if coarse_pool not in Downsample.POOLS:
        raise ValueError(f"coarse_pool must be one of {Downsample.POOLS}, got {coarse_pool!r}.")
    args = (spatial_dims, in_channels, encoder_channels, decoder_channels)
    coarse_in = in_channels * (coarse_factor**spatial_dims if coarse_pool == "unshuffle" else 1)
    coarse_args = (spatial_dims, coarse_in, encoder_channels, decoder_channels)
    coarse_blocks = [unet_step(*coarse_args, sigma=coarse_sigma) for _ in range(coarse_steps)]
    resample = as_bool(resample_coarse, "resample_coarse")
    coarse = RegistrationNet(Downsample(chain(*coarse_blocks), coarse_factor, resample=resample, pool=coarse_pool))
    if coarse_weights is not None:
        load_weights(coarse, coarse_weights)
    if fine_steps == 0:
        return coarse
    first = Frozen(coarse.block, frozen=freeze_coarse)
    return RegistrationNet(chain(first, *[unet_step(*args) for _ in range(fine_steps)]))
