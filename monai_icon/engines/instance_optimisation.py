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

from monai_icon.losses.icon import ICONLoss
from monai_icon.networks.blocks import check_image_pair
from monai_icon.networks.maps import ComposedMap, DisplacementMap, Map, identity_grid, resize_linear
from monai_icon.networks.registration_net import register_pair

__all__ = [
    "IO_MODES",
    "DEFAULT_IO_LR",
    "Refinement",
    "default_io_lr",
    "WeightSnapshot",
    "restored_weights",
    "instance_optimise",
    "optimise_each_pair",
    "residual_instance_optimise",
    "pyramid_shapes",
    "multilevel_field",
    "InstanceOptimisedNet",
]

IO_MODES = ("network", "residual")
#: The default learning rate (Adam) of each mode: fine-tuning the network's weights, or residual fields on its maps.
DEFAULT_IO_LR = {"network": 2e-5, "residual": 2e-3}


@dataclass(frozen=True)
class Refinement:
    """The instance-optimisation settings of a registration as one value (the ``io_*`` arguments of
    :func:`monai_icon.apps.register_files`; the recommended one:
    :func:`monai_icon.apps.presets.recommended_refinement`).

    Attributes:
        steps: optimisation steps (0: the network alone).
        lr: Adam's learning rate (``None``: :data:`DEFAULT_IO_LR` of the mode).
        mode: ``"network"`` (fine-tune the weights) or ``"residual"`` (residual fields on the network's maps).
        size: the grid the images are compared on (residual mode; ``None``: the network grid).
        levels: residual fields on this many grids, each half the previous one.
        field_size: the grid of the residual fields when it differs from ``size``.
        fine_steps: with ``size``, only the last this many steps compare the images on it.
    """

    steps: int = 0
    lr: float | None = None
    mode: str = "network"
    size: tuple[int, ...] | None = None
    levels: int = 1
    field_size: tuple[int, ...] | None = None
    fine_steps: int | None = None

    def arguments(self) -> dict[str, Any]:
        """The settings as the ``io_*`` keyword arguments of :func:`monai_icon.apps.register_files`."""
        return {"io_steps": self.steps, "io_lr": self.lr, "io_mode": self.mode, "io_size": self.size,
                "io_levels": self.levels, "io_field_size": self.field_size, "io_fine_steps": self.fine_steps}

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
