# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Schedules driven by the iteration: lambda continuation (start with a small inverse consistency weight, raise it
to the target) and the learning rate's warm-up + cosine decay. Neither keeps state: each value is a function of
``engine.state.iteration`` and the planned total, so a resumed run (even one given more epochs) is on schedule."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from torch.optim import Optimizer

from monai_icon.schedules import lambda_at, lr_factor_at

__all__ = ["LambdaScheduleHandler", "LearningRateScheduleHandler"]


class LambdaScheduleHandler:
    """Before every iteration set ``loss_function.lmbda`` to :func:`~monai_icon.schedules.lambda_at` of the
    iteration: geometric from ``start`` to ``target`` over the first ``ramp_fraction`` of ``total_steps``, then
    ``target``. A large fixed lambda makes training from the identity slow (``docs/results.md``: at lambda 512 the
    U-Net learns several times slower than at 64); the continuation learns to register first and ends on the
    paper's loss at ``target``.

    The value depends only on ``engine.state.iteration``, so a resumed run continues on the same schedule. Do not
    combine with :class:`AdaptiveLambdaHandler` (each would overwrite the other's lambda).

    Args:
        loss_function: an object with a float attribute ``lmbda`` (an :class:`~monai_icon.losses.ICONLoss`).
        start, target: lambda at the first iteration and after the ramp (both > 0).
        ramp_fraction: fraction of ``total_steps`` the ramp lasts, in ``[0, 1]`` (0: ``target`` throughout).
        total_steps: planned iterations of the whole run (``epochs * iterations_per_epoch``).
    """

    def __init__(self, loss_function: Any, start: float, target: float, ramp_fraction: float, total_steps: int) -> None:
        if not hasattr(loss_function, "lmbda"):
            raise ValueError("loss_function must have a 'lmbda' attribute (use monai_icon.losses.ICONLoss).")
        lambda_at(0, total_steps, start, target, ramp_fraction)  # validates the arguments now
        self.loss_function = loss_function
        self.start, self.target = float(start), float(target)
        self.ramp_fraction, self.total_steps = float(ramp_fraction), int(total_steps)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        step = max(0, engine.state.iteration - 1)  # ITERATION_STARTED: iteration already counts this one
        self.loss_function.lmbda = lambda_at(step, self.total_steps, self.start, self.target, self.ramp_fraction)
        engine.state.metrics["lmbda"] = self.loss_function.lmbda


class LearningRateScheduleHandler:
    """Before every iteration set each parameter group's learning rate to its base value times
    :func:`~monai_icon.schedules.lr_factor_at` of the iteration: linear warm-up over ``warmup`` steps, then
    ``"cosine"`` decay to ``final_fraction`` at ``total_steps`` (or ``"constant"``).

    The base learning rates are the optimiser's at construction (the config's ``learning_rate``), not what a
    checkpoint restores, and the factor depends only on the iteration: resuming, even with a longer run, continues
    on the schedule of the new ``total_steps``. (PyTorch's ``LambdaLR`` would restore the schedule object's
    attributes from the checkpoint, so a resumed run given more epochs would keep the old, finished cosine.)

    Args:
        optimizer: its parameter groups' ``lr`` are the base values.
        total_steps: planned iterations of the whole run.
        warmup, schedule, final_fraction: see :func:`~monai_icon.schedules.lr_factor_at`.
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int, warmup: int = 0, schedule: str = "cosine",
        final_fraction: float = 0.0,
    ) -> None:
        lr_factor_at(0, total_steps, warmup, schedule, final_fraction)  # validates the arguments now
        self.optimizer = optimizer
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.total_steps, self.warmup = total_steps, warmup
        self.schedule, self.final_fraction = schedule, final_fraction

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        step = max(0, engine.state.iteration - 1)
        factor = lr_factor_at(step, self.total_steps, self.warmup, self.schedule, self.final_fraction)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        engine.state.metrics["lr"] = self.base_lrs[0] * factor
