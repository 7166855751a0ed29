# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Random spatial (affine + smooth deformation) and intensity (gamma) augmentation of whole batches, on the
batch's device.

Registration training on a small population (586 MNIST fives) overfits: the shipped 2D model registers its
training pairs to 0.918 Dice and held-out pairs to 0.84-0.86 (docs/results.md). Each image of a pair gets its own
small random rotation, scaling and translation (and, optionally, a smooth random deformation and an intensity
gamma) here, so the network sees new "subjects" every step. In 3D the same holds more strongly: the T1-head demo's
network registers its 9 training copies' pairs to 0.68 label Dice and held-out pairs to 0.58 (docs/results.md). MONAI's
``RandAffined`` does the same per item, one image at a time on the CPU (a large share of a 2D training step at
batch 32); this transform draws every sample's matrix at once and warps the batch with one ``grid_sample`` call, on the
GPU when the batch is there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform

from monai_icon.networks.maps import resize_linear

__all__ = [
    "random_affine_theta", "random_smooth_displacement", "affine_warp", "RandBatchAugmentd", "chain_batch_transforms"
]


def _rotation(angles: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``[B, D, D]`` rotations from ``[B, 1]`` (2D) or ``[B, 3]`` (3D, about each axis in turn) angles (radians)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    if spatial_dims == 2:
        return torch.stack([torch.stack([c[:, 0], -s[:, 0]], -1), torch.stack([s[:, 0], c[:, 0]], -1)], 1)
    rx = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c[:, 0], -s[:, 0]], -1),
                      torch.stack([zero, s[:, 0], c[:, 0]], -1)], 1)
    ry = torch.stack([torch.stack([c[:, 1], zero, s[:, 1]], -1), torch.stack([zero, one, zero], -1),
                      torch.stack([-s[:, 1], zero, c[:, 1]], -1)], 1)
    rz = torch.stack([torch.stack([c[:, 2], -s[:, 2], zero], -1), torch.stack([s[:, 2], c[:, 2], zero], -1),
                      torch.stack([zero, zero, one], -1)], 1)
    return rz @ ry @ rx


def _check_affine_ranges(rotate_degrees: float, scale: float, translate: float, prob: float) -> None:
    for name, value in (("rotate_degrees", rotate_degrees), ("scale", scale), ("translate", translate)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite value >= 0, got {value}.")
    if scale >= 1:
        raise ValueError(f"scale must be < 1 (factors 1 +- scale must stay positive), got {scale}.")
    if not 0 <= prob <= 1:
        raise ValueError(f"prob must be in [0, 1], got {prob}.")


def _check_deformation(magnitude: float, control_points: int) -> None:
    if not math.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"magnitude must be a finite number of voxels >= 0, got {magnitude}.")
    if control_points < 2:
        raise ValueError(f"control_points must be >= 2 per axis, got {control_points}.")


def random_affine_theta(
    batch: int,
    spatial_size: Sequence[int],
    rotate_degrees: float = 0.0,
    scale: float = 0.0,
    translate: float = 0.0,
    prob: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random affine matrices for :func:`torch.nn.functional.affine_grid` (``align_corners=True``).

    Each sample gets a rotation about the image centre (angle uniform in ``±rotate_degrees`` about every axis),
    a scaling (factor uniform in ``1 ± scale`` per axis) and a translation (uniform in ``±translate`` voxels per
    axis), defined in voxel units so that a rotation stays a rotation on non-square grids; with probability
    ``1 - prob`` a sample keeps the identity.

    Returns:
        ``[batch, D, D + 1]`` matrices in grid_sample's normalised coordinates (x = last axis first).
    """
    dims = len(spatial_size)
    if dims not in (2, 3):
        raise ValueError(f"random affine augmentation is 2D or 3D, got a spatial size of {dims} dims.")
    _check_affine_ranges(rotate_degrees, scale, translate, prob)

    def uniform(*shape: int) -> torch.Tensor:
        return 2 * torch.rand(*shape, generator=generator, dtype=torch.float64) - 1

    angles = uniform(batch, 1 if dims == 2 else 3) * math.radians(rotate_degrees)
    factors = 1 + uniform(batch, dims) * scale
    shifts = uniform(batch, dims) * translate
    keep = torch.rand(batch, generator=generator, dtype=torch.float64) >= prob
    # voxel units, x-first (grid_sample's order): output point p -> input point R S p + t about the centre
    matrix = _rotation(angles, dims) @ torch.diag_embed(factors)
    matrix[keep] = torch.eye(dims, dtype=torch.float64)
    shifts[keep] = 0
    half = torch.tensor([(n - 1) / 2 for n in reversed(spatial_size)], dtype=torch.float64).clamp_min(0.5)
    theta = torch.cat([matrix * half[None, None, :] / half[None, :, None], (shifts / half)[..., None]], -1)
    return theta.to(device=device, dtype=dtype)


def random_smooth_displacement(
    batch: int,
    spatial_size: Sequence[int],
    magnitude: float,
    control_points: int = 5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Smooth random displacements in grid_sample's normalised units, ``[batch, *spatial_size, D]`` (x first).

    Control-point displacements on a ``control_points``-per-axis lattice, normal with a standard deviation of
    ``magnitude`` voxels per axis, linearly upsampled to the image grid (``align_corners=True``): the kind of
    deformation :func:`monai_icon.data.write_deformed_copies` draws, in voxels.
    """
    dims = len(spatial_size)
    _check_deformation(magnitude, control_points)
    coarse = torch.randn(batch, dims, *([control_points] * dims), generator=generator, dtype=torch.float64)
    coarse = coarse * magnitude * torch.tensor([2 / max(n - 1, 1) for n in spatial_size],
                                               dtype=torch.float64).reshape(1, dims, *([1] * dims))
    fine = resize_linear(coarse.to(device=device, dtype=dtype), tuple(spatial_size))
    return fine.flip(1).movedim(1, -1)  # channel d = axis 2 + d -> grid_sample's x-first last dimension


def affine_warp(images: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear",
                displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``[B, C, *spatial]`` images by ``[B, D, D + 1]`` matrices (zeros outside, ``align_corners=True``),
    plus an optional displacement ``[B, *spatial, D]`` in normalised units (:func:`random_smooth_displacement`)."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=True)
    if displacement is not None:
        grid = grid + displacement.to(images.dtype)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=True)


class RandBatchAugmentd(MapTransform):
    """Independent random augmentation of each image key of a **batch** dictionary (``[B, C, *spatial]``): an
    affine transform, optionally a smooth random deformation on top, and optionally an intensity gamma.

    Every sample of every key in ``keys`` gets its own matrix (a pair's moving and fixed images are augmented
    independently: new subjects, not a known transform); each key in ``follow`` (``{label_key: image_key}``) is
    resampled with its image's matrices by nearest neighbour (labels, masks). Runs on the tensors' device.

    Args:
        keys: image keys (linear interpolation, zeros outside).
        rotate_degrees, scale, translate, prob: see :func:`random_affine_theta`.
        deform: standard deviation (voxels) of a smooth random deformation's control-point displacements
            (:func:`random_smooth_displacement`, ``deform_points`` per axis); 0: none.
        deform_points: control points per axis; a sequence (e.g. ``[4, 6, 10]``) sums one deformation per
            lattice (several spatial scales).
        deform_random: each sample's standard deviation at each lattice uniform in ``[0, deform]`` instead of
            ``deform`` (a wide distribution of magnitudes, small ones included).
        gamma: each image (intensities in [0, 1]) is raised to a power log-uniform in ``[1 / gamma, gamma]``
            (labels are not); 1: none.
        follow: ``{key: image key}`` resampled like that image, nearest neighbour.
        seed: seed of the transform's own generator (reproducible augmentation, resumed runs draw new ones).
        allow_missing_keys: skip keys absent from the batch.

    Raises:
        KeyError / ValueError: a missing key, a follower of a key not augmented, images of different shapes.
    """

    def __init__(
        self,
        keys: KeysCollection,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate: float = 2.0,
        prob: float = 1.0,
        deform: float = 0.0,
        deform_points: int | Sequence[int] = 5,
        deform_random: bool = False,
        gamma: float = 1.0,
        follow: Mapping[str, str] | None = None,
        seed: int | None = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.follow = dict(follow or {})
        for label_key, image_key in self.follow.items():
            if image_key not in self.keys:
                raise ValueError(f"follow: {label_key!r} follows {image_key!r}, which is not one of keys {self.keys}.")
        _check_affine_ranges(rotate_degrees, scale, translate, prob)
        points = [int(deform_points)] if isinstance(deform_points, int) else [int(p) for p in deform_points]
        if not points:
            raise ValueError("deform_points must name at least one lattice.")
        for count in points:
            _check_deformation(deform, count)
        if not math.isfinite(gamma) or gamma < 1:
            raise ValueError(f"gamma must be a finite value >= 1 (powers in [1/gamma, gamma]), got {gamma}.")
        self.rotate_degrees, self.scale, self.translate, self.prob = rotate_degrees, scale, translate, prob
        self.deform, self.deform_points, self.deform_random, self.gamma = deform, points, bool(deform_random), gamma
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def _displacement(self, batch: int, size: Sequence[int], device: torch.device) -> torch.Tensor | None:
        """The sum of the deformations on every lattice of ``deform_points`` (``None`` without deformation)."""
        if self.deform <= 0:
            return None
        total = None
        for count in self.deform_points:
            field = random_smooth_displacement(batch, size, self.deform, count, self.generator, device)
            if self.deform_random:
                scale = torch.rand(batch, generator=self.generator).to(device)
                field = field * scale.reshape(batch, *([1] * (field.ndim - 1)))
            total = field if total is None else total + field
        return total

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            images = torch.as_tensor(d[key])
            if images.ndim not in (4, 5):
                raise ValueError(f"{key!r}: expected a batch [B, C, *spatial] of 2D or 3D images, got shape "
                                 f"{tuple(images.shape)}.")
            batch, size = images.shape[0], images.shape[2:]
            theta = random_affine_theta(batch, size, self.rotate_degrees, self.scale, self.translate, self.prob,
                                        self.generator, images.device)
            displacement = self._displacement(batch, size, images.device)
            warped = affine_warp(images.float(), theta, displacement=displacement)
            if self.gamma > 1:
                log_gamma = (2 * torch.rand(batch, generator=self.generator) - 1) * math.log(self.gamma)
                powers = log_gamma.exp().to(warped.device).reshape(batch, *([1] * (warped.ndim - 1)))
                warped = warped.clamp_min(0) ** powers
            d[key] = warped.to(images.dtype)
            for label_key in (k for k, v in self.follow.items() if v == key and k in d):
                labels = torch.as_tensor(d[label_key])
                if labels.shape[0] != images.shape[0] or labels.shape[2:] != images.shape[2:]:
                    raise ValueError(f"{label_key!r} ({tuple(labels.shape)}) does not match {key!r} "
                                     f"({tuple(images.shape)}) in batch size and spatial shape.")
                d[label_key] = affine_warp(labels.float(), theta, "nearest", displacement).to(labels.dtype)
        return d


def chain_batch_transforms(*transforms: Callable | None) -> Callable | None:
    """The batch transforms that are not ``None`` (disabled bundle components), applied in order: ``None`` if there
    are none, the transform itself if there is one, else a MONAI ``Compose`` of them."""
    present = [t for t in transforms if t is not None]
    for t in present:
        if not callable(t):
            raise TypeError(f"a batch transform must be callable, got {type(t).__name__}.")
    if not present:
        return None
    return present[0] if len(present) == 1 else Compose(present)
