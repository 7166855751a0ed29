# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Gradient-norm clipping for MONAI trainers (between the backward pass and the optimiser step)."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipHandler"]


class GradientClipHandler:
    """Clip the global gradient norm of the trainer's network before each optimiser step
    (``torch.nn.utils.clip_grad_norm_`` on ``IterationEvents.BACKWARD_COMPLETED``, which
    :class:`~monai_icon.engines.ICONTrainer` fires between ``backward`` and ``optimizer.step``).

    A single Adam spike can throw a displacement network out of the image (the map then gets no gradient back);
    clipping keeps training stable at the learning rates a short CPU budget needs. The norm before clipping is
    kept in ``engine.state.grad_norm``. With AMP the gradients are unscaled first.

    Args:
        max_norm: largest allowed global gradient norm.
        norm_type: the norm's order (2 = Euclidean).
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}.")
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        params = [p for p in engine.network.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm, self.norm_type)) if params else 0.0
        setattr(engine.state, "grad_norm", grad_norm)  # ignite's State takes new attributes; its type lists none
