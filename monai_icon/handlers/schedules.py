# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Lambda continuation: start training with a small inverse consistency weight and raise it to the target."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

from monai_icon.schedules import lambda_at

__all__ = ["LambdaScheduleHandler"]


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
