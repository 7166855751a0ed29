# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""``ICONEvaluator``: a MONAI ``SupervisedEvaluator`` for pairwise registration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.transforms import Transform
from ignite.engine import Events

from monai_icon.engines.instance_optimisation import WeightSnapshot, optimise_each_pair
from monai_icon.engines.keys import RegKeys
from monai_icon.engines.prepare_batch import PrepareRegistrationBatch
from monai_icon.losses.icon import ICONLoss
from monai_icon.losses.similarity import per_pair
from monai_icon.networks.maps import (
    DisplacementMap,
    Map,
    identity_grid,
    interpolate,
    map_grid_to_ddf,
    one_hot_labels,
    warp_labels,
)
from monai_icon.networks.registration_net import register_one_way, register_pair

__all__ = ["ICONEvaluator"]


class ICONEvaluator(SupervisedEvaluator):
    """Evaluate a registration network on moving/fixed pairs.

    ``engine.state.output`` (per pair after decollation) holds ``pred`` (moving image warped onto the fixed grid),
    ``ddf`` (MONAI voxel DDF of ``phi_AB``), ``time`` (seconds per pair for the registration), the inputs, and,
    with labels, ``pred_label`` / ``fixed_label`` / ``moving_label`` (one-hot, ``num_classes`` channels; the last one
    unregistered, for Dice before registration); with a ``loss_function``
    also ``similarity``, ``inverse_consistency`` and ``folds`` per pair. Attach metrics such as
    :class:`~monai_icon.handlers.ThresholdDice`, :class:`~monai_icon.handlers.Folds`, MONAI ``MeanDice`` on the
    labels and :class:`~monai_icon.handlers.OutputValue` as usual (``key_val_metric``, ``additional_metrics``).

    Args:
        network: a :class:`~monai_icon.networks.RegistrationNet` or a registration block.
        loss_function: optional :class:`~monai_icon.losses.ICONLoss` for similarity and inverse consistency
            values (build it with ``reduction="none"`` for per-pair values); it also registers ``phi_BA``.
        num_classes: number of label classes (with background), required when batches carry labels.
        label_mode: ``"linear"`` (one-hot + linear interpolation + arg-max) or ``"nearest"``.
        io_steps: instance optimisation (0 = off): before registering each pair, this many Adam steps of
            ``io_loss`` on that pair alone (both directions, the ICON loss), then the trainable weights are restored
            from one snapshot taken when the evaluation starts (no per-pair copy of the state dict). ``time``
            includes it.
        io_lr: its learning rate.
        io_loss: its loss (default: ``loss_function``, which is then required).
        Other arguments: as ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: torch.nn.Module,
        loss_function: ICONLoss | None = None,
        num_classes: int | None = None,
        label_mode: str = "linear",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = PrepareRegistrationBatch(),
        iteration_update: Callable | None = None,
        postprocessing: Transform | None = None,
        key_val_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        decollate: bool = True,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        io_steps: int = 0,
        io_lr: float = 2e-5,
        io_loss: ICONLoss | None = None,
    ) -> None:
        if label_mode not in ("linear", "nearest"):
            raise ValueError(f"label_mode must be 'linear' or 'nearest', got {label_mode!r}.")
        if isinstance(io_steps, bool) or not isinstance(io_steps, int) or io_steps < 0:
            raise ValueError(f"io_steps must be an integer >= 0, got {io_steps!r}.")
        if not (isinstance(io_lr, (int, float)) and 0 < io_lr < float("inf")):
            raise ValueError(f"io_lr must be a positive number, got {io_lr!r}.")
        if io_steps and io_loss is None and loss_function is None:
            raise ValueError("instance optimisation (io_steps > 0) needs io_loss or loss_function.")
        extra: dict[str, Any] = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            amp=amp and torch.device(device).type == "cuda",
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            **extra,
        )
        self.loss_function = loss_function
        self.num_classes = num_classes
        self.label_mode = label_mode
        self.io_steps, self.io_lr = io_steps, float(io_lr)
        self.io_loss = io_loss if io_loss is not None else loss_function
        self._snapshot: WeightSnapshot | None = None
        if io_steps:
            self.add_event_handler(Events.STARTED, self._take_snapshot)

    def _take_snapshot(self, engine: ICONEvaluator) -> None:
        self._snapshot = WeightSnapshot(engine.network)

    def _instance_optimised_map(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[Map, Map | None]:
        """Per pair: optimise, register (without gradients), restore the weights; maps of the whole batch."""
        if self._snapshot is None:
            self._snapshot = WeightSnapshot(self.network)
        grids_AB, grids_BA = [], []
        shape = moving.shape[2:]
        pairs = optimise_each_pair(self.network, self._snapshot, moving, fixed, cast(ICONLoss, self.io_loss),
                                   self.io_steps, self.io_lr)
        for m, f in pairs:
            with torch.no_grad():
                if self.loss_function is not None:
                    phi_AB, phi_BA = register_pair(self.network, m, f)
                    grids_BA.append(phi_BA.grid(shape))
                else:
                    phi_AB = register_one_way(self.network, m, f)
                grids_AB.append(phi_AB.grid(shape))
        identity = identity_grid(shape, device=moving.device)
        maps = [DisplacementMap(torch.cat(g) - identity) for g in (grids_AB, grids_BA) if g]
        return maps[0], (maps[1] if len(maps) > 1 else None)

    def _iteration(self, engine: ICONEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        moving, fixed, moving_label, fixed_label = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        output: dict[str, Any] = {RegKeys.MOVING: moving, RegKeys.FIXED: fixed}
        if RegKeys.PAIR_ID in batchdata:
            output[RegKeys.PAIR_ID] = batchdata[RegKeys.PAIR_ID]
        engine.state.output = output
        batch, shape = moving.shape[0], moving.shape[2:]
        with engine.mode(engine.network), torch.autocast("cuda", enabled=engine.amp, **engine.amp_kwargs):
            if moving.device.type == "cuda":
                torch.cuda.synchronize(moving.device)
            start = time.perf_counter()
            if engine.io_steps:
                phi_AB, phi_BA_io = engine._instance_optimised_map(moving, fixed)
                if phi_BA_io is not None:
                    phi_BA = phi_BA_io
            elif engine.loss_function is not None:
                phi_AB, phi_BA = register_pair(engine.network, moving, fixed)
            else:
                phi_AB = register_one_way(engine.network, moving, fixed)
            grid = phi_AB.grid(shape)
            if moving.device.type == "cuda":
                torch.cuda.synchronize(moving.device)
            output[RegKeys.TIME] = torch.full((batch,), (time.perf_counter() - start) / batch)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            output[RegKeys.PRED] = interpolate(moving, grid)
            output[RegKeys.DDF] = map_grid_to_ddf(grid)
            if engine.loss_function is not None:
                result = engine.loss_function(moving, fixed, phi_AB, phi_BA)
                output[RegKeys.SIMILARITY] = per_pair(result.similarity, batch)
                output[RegKeys.INVERSE_CONSISTENCY] = per_pair(result.inverse_consistency, batch)
                output[RegKeys.FOLDS] = result.folds
            if moving_label is not None and fixed_label is not None:
                if engine.num_classes is None:
                    raise ValueError("the batches carry labels: set num_classes of the ICONEvaluator.")
                output[RegKeys.PRED_LABEL] = warp_labels(moving_label, grid, engine.num_classes, engine.label_mode)
                output[RegKeys.FIXED_LABEL] = one_hot_labels(fixed_label, engine.num_classes, grid.dtype)
                # unregistered
                output[RegKeys.MOVING_LABEL] = one_hot_labels(moving_label, engine.num_classes, grid.dtype)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
