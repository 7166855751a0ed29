# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's adaptive lambda schedule (supplement 6.1)."""

from __future__ import annotations

import math
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_icon.engines.keys import RegKeys

__all__ = ["AdaptiveLambdaHandler", "batch_mean_folds"]


def batch_mean_folds(output: Any, key: str = RegKeys.FOLDS) -> float:
    """Mean fold count of the pairs of one iteration, from a decollated (list) or batched (dict) output."""
    if isinstance(output, dict):
        values = torch.as_tensor(output[key], dtype=torch.float32)
    else:
        values = torch.stack([torch.as_tensor(item[key], dtype=torch.float32).reshape(()) for item in output])
    return float(values.mean())


class AdaptiveLambdaHandler:
    """After every iteration, raise ``loss_function.lmbda`` by ``increment`` if the batch-mean folds exceed
    ``threshold`` (the acceptable number of folds per image).

    Reference values: ``+0.1`` when folds > 25 at quarter resolution, ``+0.8`` when folds > 200 at half
    resolution (OAI). The current lambda is written to ``engine.state.metrics["lmbda"]`` for logging; in
    distributed training the decision uses the mean over all processes, so every process keeps the same lambda.
    The handler is checkpointable (``state_dict``/``load_state_dict``): put it in ``CheckpointSaver``'s and
    ``CheckpointLoader``'s ``save_dict``/``load_dict`` so a resumed run continues with the lambda it had.

    Args:
        loss_function: an object with a float attribute ``lmbda`` (an :class:`~monai_icon.losses.ICONLoss`).
        threshold: acceptable folds per image (a negative value raises lambda every iteration: a linear ramp).
        increment: added to lambda each iteration the threshold is exceeded.
        max_lmbda: optional upper bound.
        folds_key: output key holding the per-pair fold counts.
    """

    def __init__(
        self,
        loss_function: Any,
        threshold: float = 200.0,
        increment: float = 0.8,
        max_lmbda: float | None = None,
        folds_key: str = RegKeys.FOLDS,
    ) -> None:
        if not hasattr(loss_function, "lmbda"):
            raise ValueError("loss_function must have a 'lmbda' attribute (use monai_icon.losses.ICONLoss).")
        if increment < 0:
            raise ValueError(f"increment must be >= 0, got {increment}.")
        self.loss_function = loss_function
        self.threshold = float(threshold)
        self.increment = float(increment)
        self.max_lmbda = max_lmbda
        self.folds_key = folds_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        folds = batch_mean_folds(engine.state.output, self.folds_key)
        if math.isnan(folds):  # an ICONLoss built with compute_folds=False reports no folds
            raise ValueError(f"the adaptive lambda reads the folds of every iteration, but the engine's output "
                             f"{self.folds_key!r} is NaN: build the loss with compute_folds=True.")
        if idist.get_world_size() > 1:  # every process must take the same decision
            folds = float(idist.all_reduce(torch.tensor(folds, device=idist.device()))) / idist.get_world_size()
        if folds > self.threshold:
            lmbda = self.loss_function.lmbda + self.increment
            self.loss_function.lmbda = lmbda if self.max_lmbda is None else min(lmbda, float(self.max_lmbda))
        engine.state.metrics["lmbda"] = self.loss_function.lmbda

    def state_dict(self) -> dict[str, float]:
        return {"lmbda": float(self.loss_function.lmbda)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loss_function.lmbda = float(state_dict["lmbda"])
