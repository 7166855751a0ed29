# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Factories that build the bundles' handler lists and checkpoint objects from plain config values.

The bundle configs call them as ``_target_`` components (e.g. ``_target_: monai_icon.handlers.factories.handler_list``)
instead of holding the same logic in ``$``-expressions. Each returns ``None`` where the setting turns its object off,
as a MONAI ``_disabled_`` component would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine
from ignite.handlers import EMAHandler
from monai.handlers import CheckpointLoader
from torch import nn

from monai_icon.config import as_bool
from monai_icon.handlers.checkpoint import latest_checkpoint
from monai_icon.handlers.gradient_clipping import GradientClipHandler
from monai_icon.handlers.metrics import LabelDice

__all__ = [
    "attach_handlers",
    "checkpoint_state",
    "ema_handler",
    "gradient_clip_handler",
    "handler_list",
    "label_dice_metrics",
    "output_items",
    "resume_loader",
]


def handler_list(handlers: Iterable[Any] = (), main_process_handlers: Iterable[Any] = (),
                 main_process: bool = True) -> list[Any]:
    """The handlers that are not ``None`` (disabled components), followed, in this process only when
    ``main_process`` (rank 0 of several; always with one process), by those of ``main_process_handlers`` (the ones
    that print or write files)."""
    chosen = list(handlers) + (list(main_process_handlers) if main_process else [])
    return [h for h in chosen if h is not None]


def attach_handlers(engine: Engine, handlers: Iterable[Any]) -> Engine:
    """Attach each handler that is not ``None`` to ``engine``, in the given order; returns ``engine``."""
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)
    return engine


def gradient_clip_handler(max_norm: float | None) -> GradientClipHandler | None:
    """A :class:`GradientClipHandler` clipping the gradient norm to ``max_norm``; ``None`` (no clipping) when
    ``max_norm`` is ``None``."""
    return None if max_norm is None else GradientClipHandler(max_norm=float(max_norm))


def output_items(keys: Sequence[str]) -> Callable[[Any], dict[str, Any]]:
    """An engine ``output_transform``: ``{key: output[0][key]}`` for the ``keys`` the engine's (first) output holds,
    e.g. ``["loss", "map_error"]`` for the progress bar."""
    names = tuple(keys)

    def transform(output: Any) -> dict[str, Any]:
        return {k: output[0][k] for k in names if k in output[0]}

    return transform


def resume_loader(resume: bool | str, directory: str, load_dict: Mapping[str, Any],
                  map_location: Any = None) -> CheckpointLoader | None:
    """A ``CheckpointLoader`` of the latest checkpoint in ``directory`` into ``load_dict`` (see
    :func:`~monai_icon.handlers.latest_checkpoint`); ``None`` when ``resume`` is false (read by
    :func:`~monai_icon.config.as_bool`) or there is no checkpoint yet."""
    path = latest_checkpoint(directory) if as_bool(resume, "resume") else None
    if path is None:
        return None
    return CheckpointLoader(load_path=path, load_dict=dict(load_dict), map_location=map_location)


def checkpoint_state(network: nn.Module, optimizer: Any, trainer: Engine, adaptive_lambda: Any,
                     ema: EMAHandler | None = None) -> dict[str, Any]:
    """What a resume checkpoint saves and loads: the network, optimizer, trainer (epoch, iteration) and adaptive
    lambda, and the moving average of the weights as ``ema_network`` when ``ema`` is not ``None``."""
    state = {"network": network, "optimizer": optimizer, "trainer": trainer, "adaptive_lambda": adaptive_lambda}
    if ema is not None:
        state["ema_network"] = ema.ema_model
    return state


def ema_handler(model: nn.Module, momentum: float | None) -> EMAHandler | None:
    """An ``ignite.handlers.EMAHandler`` averaging the weights of ``model`` (``momentum``: the weight of the new
    weights at each iteration); ``None`` when ``momentum`` is ``None``."""
    return None if momentum is None else EMAHandler(model, momentum=float(momentum))


def label_dice_metrics(metrics: Mapping[str, Any], label_names: Mapping[Any, str]) -> dict[str, Any]:
    """``metrics`` and one :class:`~monai_icon.handlers.LabelDice` per labelled structure, named
    ``val_dice_<name>`` (``label_names``: label value -> name, e.g. ``{1: "femoral_cartilage"}``)."""
    per_label = {f"val_dice_{name}": LabelDice(int(label)) for label, name in label_names.items()}
    return {**metrics, **per_label}
