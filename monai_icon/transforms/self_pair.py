# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Pairs with a known answer: a batch's fixed image replaced by its moving image under a random smooth deformation.

The ICON loss learns from image similarity alone, which is slow in 3D: within a CPU budget of a few thousand steps
the network still underfits (docs/results.md). A pair made of one image and a deformed copy of it
has a known map, so the network can also be told directly where every voxel goes
(:class:`~monai_icon.losses.MapSupervisionLoss`, the option ``map_supervision_weight`` of the bundle), a dense
signal that the similarity gives only where the images have edges. The deformations are the smooth kind
:func:`~monai_icon.transforms.random_smooth_displacement` draws (no labels, no annotation: self-supervision).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_icon.networks.maps import identity_grid, interpolate
from monai_icon.transforms.augment import _check_deformation, random_smooth_displacement

__all__ = ["TARGET_MAP", "TARGET_WEIGHT", "RandSelfPaird"]

TARGET_MAP = "target_map"
TARGET_WEIGHT = "target_weight"


class RandSelfPaird(MapTransform):
    """Replace, with probability ``prob`` per sample, a **batch**'s fixed image by its moving image deformed by a
    random smooth displacement, and record the map that registers the new pair.

    For a selected sample ``B(x) = A(x + u(x))`` (linear interpolation, zeros outside), so the true
    ``phi_AB = id + u`` (the pull-back convention of :mod:`monai_icon.networks.maps`: ``A o phi_AB = B``). The batch
    gets ``target_key``: ``[B, D, *N]`` maps in ``[0, 1]`` units on the images' grid (the identity for samples not
    selected) and ``weight_key``: ``[B]`` (1 for selected samples, 0 otherwise). Runs on the tensors' device.

    Args:
        keys: ``(moving image key, fixed image key)``.
        prob: probability that a sample becomes a known-map pair (0: none, 1: all).
        deform: standard deviation (voxels) of the displacement at each control point (``deform_points`` per axis).
        gamma: the new fixed image raised to a power log-uniform in ``[1 / gamma, gamma]`` (1: none), so that the
            network does not learn that known pairs have identical intensities.
        follow: ``{fixed key: moving key}`` for labels / masks, resampled by nearest neighbour with the image
            (default: ``fixed_label`` from ``moving_label``, ``fixed_mask`` from ``moving_mask``, when present).
        target_key, weight_key: keys written into the batch.
        seed: seed of the transform's own generator.

    Raises:
        ValueError: not two keys, out-of-range options, images of different shapes.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        prob: float = 0.5,
        deform: float = 4.0,
        deform_points: int = 5,
        gamma: float = 1.0,
        follow: Mapping[str, str] | None = None,
        target_key: str = TARGET_MAP,
        weight_key: str = TARGET_WEIGHT,
        seed: int | None = 0,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving image key, fixed image key), got {self.keys}.")
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        _check_deformation(deform, deform_points)
        if not math.isfinite(gamma) or gamma < 1:
            raise ValueError(f"gamma must be a finite value >= 1 (powers in [1/gamma, gamma]), got {gamma}.")
        self.prob, self.deform, self.deform_points, self.gamma = prob, deform, deform_points, gamma
        self.follow = dict({"fixed_label": "moving_label", "fixed_mask": "moving_mask"} if follow is None else follow)
        self.target_key, self.weight_key = target_key, weight_key
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        moving_key, fixed_key = self.keys
        moving, fixed = torch.as_tensor(d[moving_key]), torch.as_tensor(d[fixed_key])
        if moving.ndim not in (4, 5) or moving.shape != fixed.shape:
            raise ValueError(f"{moving_key!r} and {fixed_key!r} must be batches [B, C, *spatial] of one 2D or 3D "
                             f"shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}.")
        batch, size = moving.shape[0], moving.shape[2:]
        selected = torch.rand(batch, generator=self.generator) < self.prob
        displacement = random_smooth_displacement(batch, size, self.deform, self.deform_points, self.generator,
                                                  moving.device)  # drawn for every sample: reproducible streams
        log_gamma = (2 * torch.rand(batch, generator=self.generator) - 1) * math.log(self.gamma)
        displacement = displacement * selected.to(displacement)[(...,) + (None,) * len(size) + (None,)]
        # grid_sample's normalised, x-first displacement -> [0, 1] units, channel d = spatial axis d
        target = identity_grid(size, moving.device) + displacement.flip(-1).movedim(-1, 1) / 2
        d[self.target_key] = target
        d[self.weight_key] = selected.to(device=moving.device, dtype=torch.float32)
        if not bool(selected.any()):
            return d
        index = selected.nonzero()[:, 0].to(moving.device)
        maps = target[index]
        warped = interpolate(moving[index].float(), maps, padding_mode="zeros")
        if self.gamma > 1:
            powers = log_gamma[selected].exp().to(warped.device).reshape(-1, *([1] * (warped.ndim - 1)))
            warped = warped.clamp_min(0) ** powers
        new_fixed = fixed.clone()
        new_fixed[index] = warped.to(fixed.dtype)
        d[fixed_key] = new_fixed
        for fixed_follower, moving_follower in self.follow.items():
            if fixed_follower not in d or moving_follower not in d:
                continue
            source, old = torch.as_tensor(d[moving_follower]), torch.as_tensor(d[fixed_follower])
            if source.shape[0] != batch or source.shape[2:] != size or old.shape != source.shape:
                raise ValueError(f"{moving_follower!r} ({tuple(source.shape)}) and {fixed_follower!r} "
                                 f"({tuple(old.shape)}) must match the images' batch and spatial shape.")
            new = old.clone()
            new[index] = interpolate(source[index].float(), maps, "nearest", "zeros").to(old.dtype)
            d[fixed_follower] = new
        return d
