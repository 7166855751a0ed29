# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""A handler saving Fig. 1-style pictures of a few validation pairs, to PNG and TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_icon.engines.keys import RegKeys
from monai_icon.networks.maps import ddf_to_map_grid
from monai_icon.visualize import registration_figure, save_registration_figure

__all__ = ["RegistrationFigureHandler"]


class RegistrationFigureHandler:
    """Draw moving, fixed, warped moving and the deformed grid (coloured by the Jacobian determinant) for the
    first ``max_pairs`` pairs of each run of the attached engine (an evaluator, or a trainer).

    Files: ``output_dir/<prefix>_epoch<NNN>.png`` (``NNN`` = ``engine.state.epoch``, which MONAI evaluators set
    to the trainer's epoch) and a copy as ``<prefix>_latest.png``; with a ``summary_writer`` (e.g. the
    ``TensorBoardStatsHandler``'s ``_writer`` or a ``SummaryWriter``) also ``add_figure``.

    Args:
        output_dir: folder for the PNG files.
        max_pairs: number of pairs drawn.
        prefix: file name prefix and TensorBoard tag.
        summary_writer: optional TensorBoard writer.
    """

    def __init__(
        self, output_dir: str | Path, max_pairs: int = 4, prefix: str = "registration", summary_writer: Any = None
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_pairs = max_pairs
        self.prefix = prefix
        self.summary_writer = summary_writer
        self._items: list[dict[str, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._draw)

    def _reset(self, engine: Engine) -> None:
        self._items = []

    def _collect(self, engine: Engine) -> None:
        if len(self._items) >= self.max_pairs:
            return
        output: Any = engine.state.output
        items = output if isinstance(output, list) else [
            {k: output[k][i] for k in (RegKeys.MOVING, RegKeys.FIXED, RegKeys.PRED, RegKeys.DDF)}
            for i in range(output[RegKeys.MOVING].shape[0])
        ]
        for item in items[: self.max_pairs - len(self._items)]:
            self._items.append(
                {k: item[k].detach().cpu() for k in (RegKeys.MOVING, RegKeys.FIXED, RegKeys.PRED, RegKeys.DDF)}
            )

    def _draw(self, engine: Engine) -> None:
        if not self._items:
            return
        stacked = {k: torch.stack([item[k] for item in self._items]) for k in self._items[0]}
        args = (
            stacked[RegKeys.MOVING][:, :1],
            stacked[RegKeys.FIXED][:, :1],
            stacked[RegKeys.PRED][:, :1],
            ddf_to_map_grid(stacked[RegKeys.DDF].float()),
        )
        epoch = int(engine.state.epoch)
        path = save_registration_figure(
            self.output_dir / f"{self.prefix}_epoch{epoch:03d}.png", *args, max_rows=self.max_pairs
        )
        save_registration_figure(self.output_dir / f"{self.prefix}_latest.png", *args, max_rows=self.max_pairs)
        if self.summary_writer is not None:
            self.summary_writer.add_figure(
                self.prefix, registration_figure(*args, max_rows=self.max_pairs), global_step=epoch
            )
        engine.logger.info(f"saved registration figure {path}")
