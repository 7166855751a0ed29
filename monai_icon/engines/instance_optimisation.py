# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Instance optimisation: a few optimiser steps of the ICON loss on one pair, then the weights restored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from monai_icon.losses.icon import ICONLoss
from monai_icon.networks.registration_net import register_pair

__all__ = ["WeightSnapshot", "restored_weights", "instance_optimise"]


class WeightSnapshot:
    """A copy of the tensors instance optimisation can change: the trainable parameters (the network stays in
    evaluation mode, so batch-norm statistics and other buffers do not move). Take it once, then
    :meth:`restore` in place after every pair: no per-pair copy of the whole state dict, and frozen parameters
    (e.g. the coarse steps of a stage-2 model) are never copied.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.saved = [(p, p.detach().clone()) for p in network.parameters() if p.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        for param, value in self.saved:
            param.copy_(value)
            param.grad = None


@contextmanager
def restored_weights(network: nn.Module) -> Iterator[nn.Module]:
    """Let instance optimisation change ``network``'s trainable weights inside the block; restore them after."""
    snapshot = WeightSnapshot(network)
    try:
        yield network
    finally:
        snapshot.restore()


def instance_optimise(
    network: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, loss: ICONLoss, steps: int = 50, lr: float = 2e-5
) -> list[float]:
    """A few Adam steps of ``loss`` (its mean over the pairs given) on ``moving``/``fixed`` (the published
    uniGradICON recipe uses 50 steps at 2e-5), with the network in evaluation mode (batch norm keeps its
    statistics). Use inside :func:`restored_weights` or with a :class:`WeightSnapshot`.

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
            value = loss(moving, fixed, phi_AB, phi_BA).loss.mean()
            value.backward()
            optimizer.step()
            history.append(float(value.detach()))
    return history
