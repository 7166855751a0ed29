# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Registration blocks: ``nn.Module`` s whose ``forward(image_A, image_B)`` returns a map ``phi_AB``.

``image_A`` is the moving image and ``image_B`` the fixed one; the returned :class:`~monai_icon.networks.maps.Map`
satisfies ``image_A o phi_AB ~ image_B`` (a pull-back from B's space to A's space, coordinates in ``[0, 1]``
with the corners on the first and last voxel centres). Blocks compose: ``TwoStep(Downsample(DisplacementField(
net_1)), DisplacementField(net_2))`` is a two-step, two-resolution registration whose map is still an exact
function. No grid is cached: every grid is built from the input shapes, on the inputs' device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d

from monai_icon.networks.maps import AffineMap, ComposedMap, DisplacementMap, Map

__all__ = [
    "check_image_pair", "RegistrationModule", "DisplacementField", "Affine", "TwoStep", "Downsample", "Frozen",
    "space_to_depth",
]


def check_image_pair(image_A: torch.Tensor, image_B: torch.Tensor, check_finite: bool = True) -> None:
    """Raise a ``ValueError`` naming the problem unless ``image_A`` and ``image_B`` form a valid pair.

    A valid pair is two float tensors of identical shape ``[B, C, H, W]`` or ``[B, C, H, W, D]`` and, with
    ``check_finite``, no NaN or infinite value (that check is skipped inside ``torch.jit.trace`` and
    ``torch.compile``, where it would break the graph: check the data before calling a compiled module).
    """
    for name, image in (("image_A", image_A), ("image_B", image_B)):
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(image).__name__}.")
        if image.ndim not in (4, 5):
            raise ValueError(
                f"{name} must be channel-first [B, C, H, W] (2D) or [B, C, H, W, D] (3D), "
                f"got {image.ndim} dimensions (shape {tuple(image.shape)})."
            )
        if not image.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {image.dtype}.")
    if image_A.shape != image_B.shape:
        raise ValueError(
            f"image_A and image_B must have the same shape, got {tuple(image_A.shape)} and {tuple(image_B.shape)}."
        )
    # a data-dependent check can neither be traced nor compiled without a graph break: skipped there
    if check_finite and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        finite = torch.stack([torch.isfinite(image_A).all(), torch.isfinite(image_B).all()])
        if not bool(finite.all()):
            bad = [n for n, ok in zip(("image_A", "image_B"), finite.tolist()) if not ok]
            raise ValueError(f"{' and '.join(bad)} contain NaN or infinite values.")


class RegistrationModule(nn.Module):
    """Base class of registration blocks: ``forward(image_A, image_B) -> Map``.

    ``forward`` validates the pair (see :func:`check_image_pair`) and calls :meth:`compute_map`, which subclasses
    implement. Composite blocks call their children's ``compute_map`` directly, so a nested model validates its
    inputs once, at the outermost block (each finiteness check is a device synchronisation on GPUs).

    Args:
        check_inputs: validate shapes and finiteness of the inputs on every ``forward`` call.
    """

    def __init__(self, check_inputs: bool = True) -> None:
        super().__init__()
        self.check_inputs = check_inputs

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Map:
        if self.check_inputs:
            check_image_pair(image_A, image_B)
        return self.compute_map(image_A, image_B)

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Map:  # pragma: no cover - abstract
        """The map ``phi_AB`` for an already validated pair."""
        raise NotImplementedError

    def forward_both(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Map, Map]:
        """``(phi_AB, phi_BA)``, validating the pair once for both directions."""
        if self.check_inputs:
            check_image_pair(image_A, image_B)
        return self.compute_map(image_A, image_B), self.compute_map(image_B, image_A)


def _child_map(block: nn.Module, image_A: torch.Tensor, image_B: torch.Tensor) -> Map:
    """Run a child block without re-validating its inputs (any ``nn.Module`` returning a map also works)."""
    if isinstance(block, RegistrationModule):
        return block.compute_map(image_A, image_B)
    return block(image_A, image_B)


class DisplacementField(RegistrationModule):
    """The paper's Eq. (11): a network predicts a displacement, the map is ``Id + interp(displacement)``.

    Args:
        net: module called as ``net(image_A, image_B)`` on ``[B, C, *N]`` images and returning a displacement
            ``[B, D, *M]`` in ``[0, 1]`` units (``D`` spatial dimensions; ``M`` is usually ``N``, any grid works).
        check_inputs: see :class:`RegistrationModule`.
        sigma: standard deviation (voxels of the displacement's grid) of a Gaussian low-pass applied to the
            displacement (MONAI's separable filtering, replicate padding, so a constant displacement is kept);
            ``0`` (default): none. A smooth output head: the gradients reaching the network are smoothed the same
            way, so early training moves smooth regions instead of fitting voxel-wise noise.

    Returns (forward):
        :class:`~monai_icon.networks.maps.DisplacementMap`.
    """

    def __init__(self, net: nn.Module, check_inputs: bool = True, sigma: float = 0.0) -> None:
        super().__init__(check_inputs)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < float("inf"):
            raise ValueError(f"sigma must be a finite number >= 0 (voxels), got {sigma!r}.")
        self.net = net
        self.sigma = float(sigma)

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> DisplacementMap:
        displacement = self.net(image_A, image_B)
        spatial_dims = image_A.ndim - 2
        if displacement.ndim != image_A.ndim or displacement.shape[:2] != (image_A.shape[0], spatial_dims):
            raise ValueError(
                f"the network must return a displacement [B, {spatial_dims}, ...] for images of shape "
                f"{tuple(image_A.shape)}, got shape {tuple(displacement.shape)}."
            )
        if self.sigma > 0:
            kernel = gaussian_1d(torch.tensor(self.sigma), truncated=3.0).to(displacement)
            kernel = kernel / kernel.sum()  # exactly unit gain: constant displacements (translations) are kept
            displacement = separable_filtering(displacement, [kernel] * spatial_dims, mode="replicate")
        return DisplacementMap(displacement)


class Affine(RegistrationModule):
    """An affine step: a network predicts ``[B, D, D + 1]`` (or ``[B, D * (D + 1)]``) offsets from the identity
    matrix; the map is ``x -> (I + M) x + t`` in ``[0, 1]`` coordinates (see :class:`AffineMap`).

    A network whose last layer is zero-initialised (e.g. :class:`monai_icon.networks.nets.AffineNet`) starts at
    the identity map. Note that ``[0, 1]`` coordinates are not isotropic in millimetres for non-cubic images.
    """

    def __init__(self, net: nn.Module, check_inputs: bool = True) -> None:
        super().__init__(check_inputs)
        self.net = net

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> AffineMap:
        spatial_dims = image_A.ndim - 2
        offsets = self.net(image_A, image_B)
        if offsets.numel() != image_A.shape[0] * spatial_dims * (spatial_dims + 1):
            raise ValueError(
                f"the affine network must return [B, {spatial_dims}, {spatial_dims + 1}] values, "
                f"got shape {tuple(offsets.shape)}."
            )
        offsets = offsets.reshape(image_A.shape[0], spatial_dims, spatial_dims + 1)
        eye = torch.eye(spatial_dims, spatial_dims + 1, device=offsets.device, dtype=offsets.dtype)
        return AffineMap(eye + offsets)


class TwoStep(RegistrationModule):
    """Two registration steps composed (supplement Eq. 11): ``phi = first(A, B)``, then
    ``psi = second(A o phi, B)`` and the result is ``phi o psi``.

    Args:
        first, second: registration blocks.
        resample: ``False`` (default): the composition itself (:class:`~monai_icon.networks.maps.ComposedMap`,
            exact wherever it is queried: one interpolation per step and point). ``True``: the composition sampled
            on the grid of ``phi``'s displacement when ``phi`` is a
            :class:`~monai_icon.networks.maps.DisplacementMap` (else on the images' grid) and linearly interpolated
            between its points, one :class:`~monai_icon.networks.maps.DisplacementMap`: a coarse field queried at
            many fine points (a map written on the fixed image's voxels) then costs one interpolation instead of one
            per step. Used by :func:`~monai_icon.networks.ensemble_network` for its passes.
    """

    def __init__(self, first: RegistrationModule, second: RegistrationModule, check_inputs: bool = True,
                 resample: bool = False) -> None:
        super().__init__(check_inputs)
        if not isinstance(resample, bool):
            raise ValueError(f"resample must be True or False, got {resample!r}.")
        self.first = first
        self.second = second
        self.resample = resample

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Map:
        phi = _child_map(self.first, image_A, image_B)
        psi = _child_map(self.second, phi.warp(image_A), image_B)
        composed = ComposedMap(phi, psi)
        if not self.resample:
            return composed
        grid = phi.displacement.shape[2:] if isinstance(phi, DisplacementMap) else image_A.shape[2:]
        return composed.sampled(grid)


def space_to_depth(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, C, *N] -> [B, C * factor^D, *ceil(N / factor)]``: each ``factor^D`` block of voxels as channels of one
    coarse voxel (channel ``c * factor^D + k``, offset ``k`` in C order; 2D or 3D). The image is replicate-padded
    at the far end of each axis to a multiple of ``factor`` first, the coarse voxels of ``ceil_mode`` pooling.
    2D is ``torch.nn.functional.pixel_unshuffle``; PyTorch has no 3D one, which this extends."""
    dims = image.ndim - 2
    if dims not in (2, 3):
        raise ValueError(f"space_to_depth takes [B, C, H, W] or [B, C, H, W, D] images, got {tuple(image.shape)}.")
    pad = [(-n) % factor for n in image.shape[2:]]
    if any(pad):
        image = F.pad(image, [v for p in reversed(pad) for v in (0, p)], mode="replicate")
    if dims == 2:
        return F.pixel_unshuffle(image, factor)
    batch, channels, sizes = image.shape[0], image.shape[1], [n // factor for n in image.shape[2:]]
    split = image.reshape(batch, channels, *[v for n in sizes for v in (n, factor)])
    # [B, C, n0, f, n1, f, n2, f] -> [B, C, f, f, f, n0, n1, n2]
    order = [0, 1, 3, 5, 7, 2, 4, 6]
    return split.permute(order).reshape(batch, channels * factor**dims, *sizes)


class Downsample(RegistrationModule):
    """Run ``block`` on images average-pooled by ``factor`` (``ceil_mode``); the map it returns is a function
    on ``[0, 1]^D`` and is evaluated at full-resolution points unchanged.

    As in the ICON reference, the coarse grid is taken to span the same ``[0, 1]`` box as the fine one (a
    sub-voxel offset of ``(factor - 1) / 2`` fine voxels at the corners is ignored).

    Args:
        block: the registration block to run at low resolution.
        factor: integer pooling factor per spatial axis (2 halves the resolution).
        resample: ``False`` (default): the block's map itself (for a multi-step block, its composition evaluated
            exactly wherever it is queried). ``True``: that map sampled on the coarse grid and linearly
            interpolated, one displacement field (:class:`~monai_icon.networks.maps.DisplacementMap`, exact at the
            coarse grid points): a multi-step block's composition is then computed once on the coarse grid
            instead of at every full-resolution point, which makes a loss on the full-resolution images cheaper
            (one interpolation per point instead of one per step). A different map between the coarse points, so
            a model trained with it must be run with it (it has no weights: state dicts are the same either way).
        pool: how the block's inputs are made coarse. ``"average"`` (default): average pooling, ``C`` channels in,
            ``C`` out. ``"unshuffle"``: space-to-depth, every ``factor^D`` block of voxels becomes ``factor^D``
            channels of one coarse voxel (``[B, C, *N] -> [B, C * factor^D, *N / factor]``, channel
            ``c * factor^D + k`` holding offset ``k`` in C order; the image is first replicate-padded to a
            multiple of ``factor``): nothing of the fine image is lost, so the block's networks (built for
            ``C * factor^D`` input channels per image) see the detail a loss on the fine images compares, at the
            coarse grid's cost. Their average over ``k`` is the average-pooled image.
    """

    POOLS = ("average", "unshuffle")

    def __init__(self, block: RegistrationModule, factor: int = 2, check_inputs: bool = True,
                 resample: bool = False, pool: str = "average") -> None:
        super().__init__(check_inputs)
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}.")
        if not isinstance(resample, bool):
            raise ValueError(f"resample must be True or False, got {resample!r}.")
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}.")
        self.block = block
        self.factor = int(factor)
        self.resample = resample
        self.pool = pool

    def _pool(self, image: torch.Tensor) -> torch.Tensor:
        if self.pool == "unshuffle":
            return space_to_depth(image, self.factor)
        pool = F.avg_pool2d if image.ndim == 4 else F.avg_pool3d
        return pool(image, kernel_size=self.factor, stride=self.factor, ceil_mode=True)

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Map:
        if self.factor > 1:
            image_A, image_B = self._pool(image_A), self._pool(image_B)
        phi = _child_map(self.block, image_A, image_B)
        if not self.resample:
            return phi
        return phi.sampled(image_A.shape[2:])


class Frozen(RegistrationModule):
    """A trained block used as a fixed first stage (the paper's 3D recipe: train the half-resolution steps, freeze
    them, then train full-resolution steps composed after them).

    The block's parameters stop requiring gradients and it stays in evaluation mode (batch norm uses its running
    statistics) even when the surrounding model is put in training mode; its network runs without building a
    graph. Maps it returns remain differentiable with respect to the points they are evaluated at, so later steps
    composed with it train normally.

    Args:
        block: the trained registration block.
        frozen: ``False`` makes this wrapper transparent (the block trains as usual) while keeping the same
            state-dict keys, so a model saved with a frozen stage loads into an unfrozen one and back.
    """

    def __init__(self, block: RegistrationModule, frozen: bool = True, check_inputs: bool = True) -> None:
        super().__init__(check_inputs)
        self.block = block
        self.frozen = bool(frozen)
        if self.frozen:
            self.block.requires_grad_(False)
            self.block.eval()

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        if self.frozen:
            self.block.eval()
        return self

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> Map:
        if not self.frozen:
            return _child_map(self.block, image_A, image_B)
        with torch.no_grad():
            return _child_map(self.block, image_A, image_B)
