# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Instance optimisation: a few optimiser steps of the ICON loss on one pair, then the weights restored."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_icon.losses.diffusion import diffusion_energy
from monai_icon.losses.icon import ICONLoss
from monai_icon.networks.blocks import check_image_pair
from monai_icon.networks.maps import ComposedMap, DisplacementMap, Map, identity_grid, interpolate, resize_linear
from monai_icon.networks.registration_net import register_one_way, register_pair

__all__ = [
    "IO_MODES",
    "RESIDUAL_MODES",
    "DEFAULT_IO_LR",
    "Refinement",
    "default_io_lr",
    "WeightSnapshot",
    "restored_weights",
    "instance_optimise",
    "optimise_each_pair",
    "residual_instance_optimise",
    "refine_one_way",
    "pyramid_shapes",
    "multilevel_field",
    "InstanceOptimisedNet",
]

IO_MODES = ("network", "residual", "one-way")
#: The default learning rate (Adam) of each mode: fine-tuning the network's weights, residual fields on its maps in
#: both directions (inverse-consistency loss), or a residual field on its moving-to-fixed map (diffusion regulariser).
DEFAULT_IO_LR = {"network": 2e-5, "residual": 2e-3, "one-way": 7e-3}
#: The grids a residual refinement works on: ``"residual"`` and ``"one-way"``.
RESIDUAL_MODES = ("residual", "one-way")


@dataclass(frozen=True)
class Refinement:
    """The instance-optimisation settings of a registration as one value (the ``io_*`` arguments of
    :func:`monai_icon.apps.register_files`; the recommended one:
    :func:`monai_icon.apps.presets.recommended_refinement`).

    Attributes:
        steps: optimisation steps (0: the network alone).
        lr: Adam's learning rate (``None``: :data:`DEFAULT_IO_LR` of the mode).
        mode: ``"network"`` (fine-tune the weights), ``"residual"`` (residual fields on the network's maps in both
            directions, the ICON loss: :func:`residual_instance_optimise`) or ``"one-way"`` (a residual field on the
            moving-to-fixed map with a diffusion regulariser: :func:`refine_one_way`, several times faster per step).
        size: the grid the images are compared on (residual modes; ``None``: the network grid, or see ``voxels``).
        levels: residual fields on this many grids, each half the previous one.
        field_size: the grid of the residual fields when it differs from ``size``.
        fine_steps: with ``size``, only the last this many steps compare the images on it.
        smoothness: weight of the diffusion regulariser of ``"one-way"`` (ignored by the other modes).
        voxels: with ``size`` and ``field_size`` not given (residual modes): compare the images on a grid of about
            this many voxels shaped like the fixed image's field of view in millimetres (one spacing on every axis,
            whatever the network grid's aspect), the fields on half of it; chosen per pair.
    """

    steps: int = 0
    lr: float | None = None
    mode: str = "network"
    size: tuple[int, ...] | None = None
    levels: int = 1
    field_size: tuple[int, ...] | None = None
    fine_steps: int | None = None
    smoothness: float = 2.0
    voxels: int | None = None

    def arguments(self) -> dict[str, Any]:
        """The settings as the ``io_*`` keyword arguments of :func:`monai_icon.apps.register_files`."""
        return {"io_steps": self.steps, "io_lr": self.lr, "io_mode": self.mode, "io_size": self.size,
                "io_levels": self.levels, "io_field_size": self.field_size, "io_fine_steps": self.fine_steps,
                "io_smoothness": self.smoothness, "io_voxels": self.voxels}

    @staticmethod
    def merge(refinement: Refinement | None, **io_arguments: Any) -> dict[str, Any]:
        """``io_arguments`` (the ``io_*`` keywords as given), or the ``refinement``'s when one is given, in which case
        every keyword must be at its default (one source of settings, never a silent mix).

        Raises:
            ValueError: a ``refinement`` together with ``io_*`` keywords that differ from their defaults.
        """
        if refinement is None:
            return io_arguments
        defaults = Refinement().arguments()
        mixed = sorted(k for k, v in io_arguments.items() if v != defaults[k])
        if mixed:
            raise ValueError(f"give the instance-optimisation settings either as refinement= or as {mixed}, not both.")
        return refinement.arguments()


def default_io_lr(io_mode: str) -> float:
    """The default learning rate of instance optimisation in ``io_mode`` (:data:`DEFAULT_IO_LR`)."""
    if io_mode not in DEFAULT_IO_LR:
        raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}.")
    return DEFAULT_IO_LR[io_mode]


class WeightSnapshot:
    """A copy of the tensors instance optimisation can change: the trainable parameters, and the buffers (batch-norm
    statistics move if the network is left in training mode; they are small). Take it once, then :meth:`restore`
    in place after every pair: no per-pair copy of the whole state dict, and frozen parameters (e.g. the coarse
    steps of a stage-2 model, most of its weights) are never copied.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.saved = [(p, p.detach().clone()) for p in network.parameters() if p.requires_grad]
        self.buffers = [(b, b.detach().clone()) for b in network.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for param, value in self.saved:
            param.copy_(value)
            param.grad = None
        for buffer, value in self.buffers:
            buffer.copy_(value)


@contextmanager
def restored_weights(network: nn.Module) -> Iterator[nn.Module]:
    """Let instance optimisation change ``network``'s trainable weights inside the block; restore them after."""
    snapshot = WeightSnapshot(network)
    try:
        yield network
    finally:
        snapshot.restore()


def instance_optimise(
    network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, loss: ICONLoss, steps: int = 50, lr: float = 2e-5,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[float]:
    """A few Adam steps of ``loss`` (its mean over the pairs given) on ``moving``/``fixed`` (the published
    uniGradICON recipe uses 50 steps at 2e-5), with the network in evaluation mode (batch norm keeps its
    statistics). Use inside :func:`restored_weights` or with a :class:`WeightSnapshot`. ``masks``:
    ``(moving_mask, fixed_mask)`` restricting the similarity, ``labels``: ``(moving_label, fixed_label)`` for a loss
    with ``label_weight > 0`` (see :class:`~monai_icon.losses.ICONLoss`).

    Returns:
        the loss before each step.

    Raises:
        ValueError: negative steps, a non-positive or non-finite learning rate, or no trainable parameters.
    """
    if steps < 0:
        raise ValueError(f"instance optimisation steps must be >= 0, got {steps}.")
    if not (lr > 0 and lr != float("inf")):
        raise ValueError(f"instance optimisation learning rate must be a positive number, got {lr}.")
    params = [p for p in network.parameters() if p.requires_grad]
    if steps > 0 and not params:
        raise ValueError("instance optimisation needs trainable parameters; this network has none.")
    optimizer = torch.optim.Adam(params, lr=lr)
    history = []
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            phi_AB, phi_BA = register_pair(network, moving, fixed)
            value = loss(moving, fixed, phi_AB, phi_BA, *(labels or (None, None)), *(masks or (None, None))).loss.mean()
            value.backward()
            optimizer.step()
            history.append(float(value.detach()))
    return history


def optimise_each_pair(
    network: nn.Module, snapshot: WeightSnapshot, moving: torch.Tensor, fixed: torch.Tensor, loss: ICONLoss,
    steps: int, lr: float,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair of a batch: run :func:`instance_optimise` on that pair alone and yield it (``[1, C, *N]`` each) while
    the network holds the tuned weights, then restore them from ``snapshot`` (also when the caller stops early or
    raises). The caller registers the yielded pair, without gradients."""
    for i in range(moving.shape[0]):
        pair = moving[i : i + 1], fixed[i : i + 1]
        try:
            instance_optimise(network, *pair, loss, steps, lr)
            yield pair
        finally:
            snapshot.restore()


def residual_instance_optimise(
    network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, loss: ICONLoss, steps: int = 50,
    lr: float = 2e-3, shape: tuple[int, ...] | None = None,
    loss_images: tuple[torch.Tensor, torch.Tensor] | None = None,
    masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    levels: int = 1,
    sample_network_maps: bool = True,
    fine_steps: int | None = None,
) -> tuple[Map, Map, list[float]]:
    """Instance optimisation without touching the network: register the pair once (no gradients), then
    optimise two free residual displacement fields ``u_AB``, ``u_BA`` (zero at the start) on top of the
    network's maps, ``phi'_AB = phi_AB o (id + u_AB)`` and likewise ``phi'_BA``, with the ICON ``loss`` (both
    directions, the inverse consistency of the refined maps). Each step costs a few interpolations instead of two
    forward and backward passes of the network, and no weights need restoring.

    Args:
        network, moving, fixed, loss: as :func:`instance_optimise`.
        steps, lr: Adam steps and learning rate on the residual fields (``[0, 1]`` units: 2e-3 moves a field by
            about a tenth of a voxel per step on a 64-voxel axis).
        shape: grid of the residual fields (default: the grid of the loss images).
        loss_images: ``(moving, fixed)`` on a finer grid of the same field of view for the loss (default: the
            network's inputs). Maps are functions of ``[0, 1]`` coordinates, so the network's maps apply to them
            unchanged: the refinement can work at a finer resolution than the network was trained at.
        masks: ``(moving_mask, fixed_mask)`` on the loss images' grid, restricting the similarity.
        labels: ``(moving_label, fixed_label)`` on the loss images' grid, for a loss with ``label_weight > 0``.
        levels: each residual is the sum of ``levels`` fields, on ``shape`` and on grids 2, 4, ... times coarser,
            linearly upsampled (:func:`multilevel_field`). Every Adam step then also moves smooth, large regions
            (the coarse-to-fine idea of classical registration, all levels at once): far fewer steps for a
            smooth deformation than one free field (``levels=1``).
        fine_steps: with ``loss_images``: only the last ``fine_steps`` steps compare them; the steps before compare
            the images on the residual grid ``shape`` (cheaper, coarser: coarse-to-fine in time): the network's
            inputs when they are on that grid, else ``loss_images`` average-pooled onto it (a network that itself
            takes the finer images). Default ``None``: every step uses ``loss_images``. Not with ``masks`` or
            ``labels`` (they are on one grid).
        sample_network_maps: evaluate the network's maps once on the residual grid and use their linear
            interpolation from there (one interpolation per evaluation instead of one per network step: a
            multi-step model's chain is not re-evaluated at every point of every step); and in every step, compose
            ``phi o (id + u)`` on the residual grid only and use the displacement field it gives there, linearly
            interpolated (one interpolation of the residual grid per map and step; the loss's finer images and
            the regulariser's off-grid points then cost one interpolation per point instead of two). An
            approximation of the maps between grid points, exact at them.

    Returns:
        ``(phi_AB, phi_BA, losses)``: the refined maps (their residuals detached) and the loss before each step.

    Raises:
        ValueError: negative steps, a non-positive learning rate or fewer than one level.
    """
    if steps < 0:
        raise ValueError(f"instance optimisation steps must be >= 0, got {steps}.")
    if not (lr > 0 and lr != float("inf")):
        raise ValueError(f"instance optimisation learning rate must be a positive number, got {lr}.")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"instance optimisation levels must be an integer >= 1, got {levels!r}.")
    if fine_steps is not None and (isinstance(fine_steps, bool) or not isinstance(fine_steps, int)
                                   or not 0 <= fine_steps <= steps or loss_images is None):
        raise ValueError(f"fine_steps must be an integer in [0, steps={steps}] and needs loss_images, got "
                         f"{fine_steps!r}{'' if loss_images is not None else ' without loss_images'}.")
    if fine_steps is not None and fine_steps < steps and (masks is not None or labels is not None):
        raise ValueError("fine_steps < steps (coarse steps on the network inputs) does not work with masks or labels "
                         "on the loss images' grid; leave fine_steps at None.")
    with torch.no_grad():
        phi_AB, phi_BA = register_pair(network, moving, fixed)
    coarse_images = (moving, fixed)
    if loss_images is not None:
        moving, fixed = loss_images
        check_image_pair(moving, fixed)
    shape = tuple(shape or moving.shape[2:])
    first_fine_step = steps - (steps if fine_steps is None else fine_steps)
    if first_fine_step > 0 and tuple(coarse_images[0].shape[2:]) != shape:
        coarse_images = (F.interpolate(moving, size=shape, mode="area"), F.interpolate(fixed, size=shape, mode="area"))
    if sample_network_maps:
        with torch.no_grad():
            identity = identity_grid(shape, moving.device)
            phi_AB, phi_BA = (phi.sampled(shape, identity) for phi in (phi_AB, phi_BA))
    dims = moving.ndim - 2
    fields = [[torch.zeros(moving.shape[0], dims, *level_shape, device=moving.device, requires_grad=True)
               for level_shape in pyramid_shapes(shape, levels)] for _ in range(2)]
    optimizer = torch.optim.Adam([f for direction in fields for f in direction], lr=lr)

    def refined(phi: Map, residual: torch.Tensor) -> Map:
        composed = ComposedMap(phi, DisplacementMap(residual))
        if not sample_network_maps:
            return composed
        return composed.sampled(shape, identity)

    history = []
    with torch.enable_grad():
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            refined_AB = refined(phi_AB, multilevel_field(fields[0], shape))
            refined_BA = refined(phi_BA, multilevel_field(fields[1], shape))
            images = (moving, fixed) if step >= first_fine_step else coarse_images
            value = loss(*images, refined_AB, refined_BA, *(labels or (None, None)),
                         *(masks or (None, None))).loss.mean()
            value.backward()
            optimizer.step()
            history.append(float(value.detach()))
    with torch.no_grad():
        u_AB, u_BA = (multilevel_field(direction, shape) for direction in fields)
        return refined(phi_AB, u_AB), refined(phi_BA, u_BA), history


def refine_one_way(
    network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, similarity: nn.Module, steps: int = 28,
    lr: float = 7e-3, shape: tuple[int, ...] | None = None,
    loss_images: tuple[torch.Tensor, torch.Tensor] | None = None, levels: int = 4, fine_steps: int | None = None,
    smoothness: float = 2.0, compose: bool = False,
) -> tuple[Map, list[float]]:
    """Fast per-pair refinement of the network's moving-to-fixed map alone: register the pair once (no gradients),
    then optimise a residual displacement field ``u`` added to the map's displacement, ``phi' = phi + u``, with Adam
    on ``similarity(moving o phi', fixed) + smoothness * mean |grad u|^2`` (a diffusion regulariser of the residual,
    its gradient in ``[0, 1]`` units per unit of the grid, i.e. displacement per field of view).

    Against :func:`residual_instance_optimise` (both directions, the inverse-consistency loss at off-grid points)
    each step costs one warp and one similarity, and no composition of two maps: several times cheaper per step, so
    that a few dozen steps on a coarse grid and a few on the finer one refine a pair in a second or two on a CPU.
    The network's map is the starting point; inverse consistency is not enforced by the refinement.

    Args:
        network: a registration network (``network(moving, fixed)`` gives the moving-to-fixed map).
        moving, fixed: the network's inputs ``[1, C, *N]``.
        similarity: a loss of ``(warped, fixed)``, e.g. LNCC (:func:`monai_icon.losses.get_similarity`).
        steps: Adam steps.
        lr: Adam's learning rate on the fields (``[0, 1]`` units).
        shape: grid of the residual fields (default: the grid of ``loss_images``, or the network's).
        loss_images: ``(moving, fixed)`` on a finer grid of the same field of view, compared in the last
            ``fine_steps`` steps (default: the network's inputs).
        levels: the residual is the sum of fields on ``shape`` and on ``levels - 1`` grids each half the previous
            one (:func:`multilevel_field`).
        fine_steps: the last this many steps compare ``loss_images``; the others compare them average-pooled onto
            ``shape`` (default ``None``: every step on ``loss_images``).
        smoothness: weight of the diffusion regulariser (``>= 0``).
        compose: compose the residual with the map instead, ``phi' = phi o (id + u)`` (the network's displacement
            resampled at the displaced points in every step: one more 3-channel warp per step, about an eighth of
            a 3D refinement's time; on the 3D validation pairs of ``docs/generalisation.md`` no more accurate).

    Returns:
        ``(phi, losses)``: the refined map (a displacement field on ``shape``; linear between its points) and the
        loss before each step.

    Raises:
        ValueError: a batch of more than one pair, a negative count or weight, or a non-positive learning rate.
    """
    check_image_pair(moving, fixed)
    if moving.shape[0] != 1:
        raise ValueError(f"refine_one_way refines one pair at a time, got a batch of {moving.shape[0]}.")
    for name, value in (("steps", steps), ("levels", levels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "levels" else 0):
            raise ValueError(f"instance optimisation {name} must be an integer >= {int(name == 'levels')}, "
                             f"got {value!r}.")
    if not (lr > 0 and lr != float("inf")):
        raise ValueError(f"instance optimisation learning rate must be a positive number, got {lr}.")
    if not (0 <= smoothness < float("inf")):
        raise ValueError(f"smoothness must be a finite number >= 0, got {smoothness}.")
    fine_steps = steps if fine_steps is None else fine_steps
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or not 0 <= fine_steps <= steps:
        raise ValueError(f"fine_steps must be an integer in [0, steps={steps}], got {fine_steps!r}.")
    with torch.no_grad():
        phi = register_one_way(network, moving, fixed)
    fine_images = loss_images if loss_images is not None else (moving, fixed)
    check_image_pair(*fine_images)
    shape = tuple(int(s) for s in (shape or fine_images[0].shape[2:]))
    identity = identity_grid(shape, moving.device)
    with torch.no_grad():
        start = phi.grid(shape) - identity  # the network's displacement on the field grid
        coarse_images = tuple(x if tuple(x.shape[2:]) == shape else F.interpolate(x, size=shape, mode="area")
                              for x in fine_images)
    stages = [(coarse_images, steps - fine_steps), (fine_images, fine_steps)]
    fields = [torch.zeros(1, len(shape), *s, device=moving.device, requires_grad=True)
              for s in pyramid_shapes(shape, levels)]
    optimizer = torch.optim.Adam(fields, lr=lr)
    per_unit = [s - 1 for s in shape]

    def displacement(residual: torch.Tensor) -> torch.Tensor:
        """The displacement of ``phi + u`` (``phi o (id + u)`` with ``compose``) on the field grid."""
        return residual + (interpolate(start, identity + residual) if compose else start)

    history = []
    with torch.enable_grad():
        for images, count in stages:
            grid = tuple(images[0].shape[2:])
            points = identity if grid == shape else identity_grid(grid, moving.device)
            for _ in range(count):
                optimizer.zero_grad(set_to_none=True)
                residual = multilevel_field(fields, shape)
                total = displacement(residual)
                coords = points + (total if grid == shape else resize_linear(total, grid))
                value = similarity(interpolate(images[0], coords), images[1]).mean()
                if smoothness > 0:
                    value = value + smoothness * diffusion_energy(residual, per_unit)
                value.backward()
                optimizer.step()
                history.append(float(value.detach()))
    with torch.no_grad():
        return DisplacementMap(displacement(multilevel_field(fields, shape))), history


def pyramid_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """``shape`` and ``levels - 1`` grids each about half the previous one per axis (at least 2 voxels)."""
    return [tuple(max(2, -(-int(s) // 2**k)) for s in shape) for k in range(levels)]


def multilevel_field(fields: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The sum of displacement fields ``[B, D, *N_k]`` (``[0, 1]`` units) of several grids, each linearly
    upsampled onto ``shape`` (corner-aligned, as the maps' identity grids are): ``[B, D, *shape]``."""
    shape = tuple(int(s) for s in shape)
    total: torch.Tensor | None = None
    for field in fields:
        field = resize_linear(field, shape)
        total = field if total is None else total + field
    if total is None:
        raise ValueError("multilevel_field needs at least one field.")
    return total


class InstanceOptimisedNet(nn.Module):
    """A bundle ``network_def`` wrapper: ``forward(cat([moving, fixed], 1))`` returns the voxel DDF of ``phi_AB``
    after ``steps`` Adam steps of ``loss`` on each pair alone (both directions), restoring the trainable weights
    after every pair (in place, from one snapshot of them). ``steps = 0`` is the plain network.

    The snapshot is taken once, at the first pair after construction or ``load_state_dict`` (so MONAI's
    ``CheckpointLoader`` on this wrapper is seen); do not change the wrapped network's weights in between by
    other means. The wrapped network's state-dict keys are kept (no ``network.`` prefix is added): a checkpoint
    of the plain network loads into this wrapper unchanged.

    Args:
        network: a :class:`~monai_icon.networks.RegistrationNet`.
        loss: the instance optimisation loss (e.g. ``ICONLoss("mse", 512)``).
        steps, lr: Adam steps per pair and learning rate.
    """

    def __init__(self, network: nn.Module, loss: ICONLoss, steps: int = 0, lr: float = 2e-5) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"io_steps must be an integer >= 0, got {steps!r}.")
        if not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
            raise ValueError(f"io_lr must be a positive number, got {lr!r}.")
        self.network, self.loss, self.steps, self.lr = network, loss, steps, float(lr)
        self._snapshot: WeightSnapshot | None = None  # taken at the first pair after weights are (re)loaded

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        self._snapshot = None
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.steps == 0:
            return self.network(x)
        if x.ndim not in (4, 5) or x.shape[1] % 2:
            raise ValueError(
                f"expected x = cat([moving, fixed], dim=1) of shape [B, 2C, *spatial], got {tuple(x.shape)}."
            )
        half = x.shape[1] // 2
        if self._snapshot is None:
            self._snapshot = WeightSnapshot(self.network)
        ddfs = []
        for moving, fixed in optimise_each_pair(self.network, self._snapshot, x[:, :half], x[:, half:], self.loss,
                                                self.steps, self.lr):
            with torch.no_grad():
                ddfs.append(self.network(torch.cat([moving, fixed], dim=1)))
        return torch.cat(ddfs)
