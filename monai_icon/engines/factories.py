# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Factories for the bundles' training and inference runs, from plain config values (called as ``_target_``
components, e.g. ``_target_: monai_icon.engines.factories.train_and_validate``)."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines import Evaluator
from torch import nn

from monai_icon.config import as_bool
from monai_icon.backend.allocator import tune_cpu_allocator
from monai_icon.engines.instance_optimisation import InstanceOptimisedNet
from monai_icon.losses.icon import ICONLoss

__all__ = ["instance_optimised_network", "train_and_validate", "trainable_parameters", "tune_cpu_allocator_on_cpu"]


def trainable_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``network`` that require gradients (frozen ones, e.g. a frozen coarse stage, left out)."""
    return [p for p in network.parameters() if p.requires_grad]


def tune_cpu_allocator_on_cpu(enabled: bool | str, device: str | torch.device) -> bool:
    """:func:`~monai_icon.backend.allocator.tune_cpu_allocator` when ``enabled`` (read by
    :func:`~monai_icon.config.as_bool`) and ``device`` is the CPU; returns whether it was tuned.

    Deprecated: the CPU backend tunes the allocator (:class:`monai_icon.backend.CPUBackend`, ``tune_allocator``;
    the bundles' ``cpu_backend`` key)."""
    if as_bool(enabled, "tune_cpu_allocator") and torch.device(device).type == "cpu":
        return bool(tune_cpu_allocator())
    return False


def train_and_validate(trainer: Engine, evaluator: Evaluator, val_interval: int = 1) -> Engine:
    """Run ``trainer``, then ``evaluator`` once more on the last epoch when ``val_interval`` (the validation
    handler's interval) did not validate it; returns ``trainer``."""
    trainer.run()
    epoch = trainer.state.epoch
    if epoch % val_interval:
        evaluator.run(epoch)
    return trainer


def instance_optimised_network(network: nn.Module, loss: ICONLoss, steps: int | str, lr: float | str,
                               device: str | torch.device) -> InstanceOptimisedNet:
    """``network`` wrapped in :class:`~monai_icon.engines.InstanceOptimisedNet` (``steps`` Adam steps of ``loss``
    at learning rate ``lr`` on each pair; 0: the plain network), on ``device``."""
    return InstanceOptimisedNet(network, loss, int(steps), float(lr)).to(device)
