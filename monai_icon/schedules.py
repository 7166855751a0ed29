# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Training schedules as pure functions of the iteration: learning-rate warm-up + cosine decay, and a
lambda continuation (start with a small inverse consistency weight, raise it geometrically to the target).

Both are used by :class:`~monai_icon.handlers.LearningRateScheduleHandler` /
:class:`~monai_icon.handlers.LambdaScheduleHandler` in the bundle and by ``experiments/recipe2d.py``;
``docs/results.md`` shows why (the paper's fixed lambda and constant learning rate 1e-4 converge slowly on a
CPU budget).
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor_at", "lambda_at"]

SCHEDULES = ("constant", "cosine")


def _check_steps(step: int, total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")


def lr_factor_at(
    step: int, total_steps: int, warmup: int = 0, schedule: str = "constant", final_fraction: float = 0.0
) -> float:
    """Multiplier of the base learning rate at iteration ``step`` (0-based).

    Linear warm-up from ``1 / (warmup + 1)`` to 1 over the first ``warmup`` steps, then ``"constant"`` (1) or
    ``"cosine"`` decay from 1 to ``final_fraction`` at ``total_steps`` (and ``final_fraction`` after it).

    Raises:
        ValueError: unknown schedule, negative warm-up, ``final_fraction`` outside ``[0, 1]``, bad step counts.
    """
    _check_steps(step, total_steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {SCHEDULES}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}.")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must lie in [0, 1], got {final_fraction}.")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lambda_at(step: int, total_steps: int, start: float, target: float, ramp_fraction: float = 0.0) -> float:
    """Inverse consistency weight at iteration ``step`` (0-based): geometric interpolation from ``start`` to
    ``target`` over the first ``ramp_fraction * total_steps`` iterations, ``target`` afterwards.

    Raises:
        ValueError: non-positive lambdas (a geometric ramp needs ``start > 0``), ``ramp_fraction`` outside
            ``[0, 1]``, bad step counts.
    """
    _check_steps(step, total_steps)
    if start <= 0 or target <= 0:
        raise ValueError(f"lambda start and target must be > 0, got {start} and {target}.")
    if not 0.0 <= ramp_fraction <= 1.0:
        raise ValueError(f"ramp_fraction must lie in [0, 1], got {ramp_fraction}.")
    ramp_steps = ramp_fraction * total_steps
    if step >= ramp_steps:
        return float(target)
    return float(start * (target / start) ** (step / ramp_steps))
