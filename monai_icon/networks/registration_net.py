# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""``RegistrationNet``: a registration block behind MONAI's single-tensor network interface."""

from __future__ import annotations

import torch
import torch.nn as nn

from monai_icon.networks.blocks import RegistrationModule
from monai_icon.networks.maps import Map

__all__ = ["RegistrationNet", "register_pair", "register_one_way"]


class RegistrationNet(nn.Module):
    """Wrap a registration block for MONAI bundles, inferers, TorchScript and MONAI Label.

    * ``net(x)`` with ``x = cat([moving, fixed], dim=1)`` (``[B, 2C, *N]``) returns the MONAI voxel DDF of
      ``phi_AB`` on the fixed grid, ``[B, D, *N]`` (channel ``i`` in voxels along axis ``i + 2``; use it with
      ``monai.networks.blocks.Warp`` to warp the moving image). This is the bundle's ``network_def`` contract.
    * ``net(moving, fixed)`` returns the maps ``(phi_AB, phi_BA)`` of both directions in one call (what the ICON
      loss needs; one ``forward`` keeps ``DistributedDataParallel`` gradient synchronisation intact).
    * ``net.register(moving, fixed)`` returns ``phi_AB`` alone.

    Args:
        block: a :class:`~monai_icon.networks.blocks.RegistrationModule`.
    """

    def __init__(self, block: RegistrationModule) -> None:
        super().__init__()
        self.block = block

    def register(self, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
        return self.block(moving, fixed)

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None):  # type: ignore[override]
        if fixed is not None:
            return self.block.forward_both(x, fixed)
        if x.ndim not in (4, 5) or x.shape[1] % 2:
            raise ValueError(
                "expected x = cat([moving, fixed], dim=1) of shape [B, 2C, *spatial] with 2 or 3 spatial dims, "
                f"got shape {tuple(x.shape)}."
            )
        half = x.shape[1] // 2
        moving, fixed_image = x[:, :half], x[:, half:]
        return self.block(moving, fixed_image).ddf(x.shape[2:])


def register_pair(network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[Map, Map]:
    """``(phi_AB, phi_BA)`` from a :class:`RegistrationNet` (possibly wrapped, e.g. by DDP) or a plain block."""
    out = network(moving, fixed)
    if isinstance(out, tuple):
        return out
    if isinstance(out, Map):
        return out, network(fixed, moving)
    raise ValueError(f"the network must return a Map or a (phi_AB, phi_BA) tuple, got {type(out).__name__}.")


def register_one_way(network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> Map:
    """``phi_AB`` alone: ``RegistrationNet.register`` (unwrapping DDP/DataParallel), else the network's own call
    (a block returning a map, or a module returning ``(phi_AB, phi_BA)``)."""
    register = getattr(getattr(network, "module", network), "register", None)
    if callable(register):
        return register(moving, fixed)
    out = network(moving, fixed)
    return out[0] if isinstance(out, tuple) else out
