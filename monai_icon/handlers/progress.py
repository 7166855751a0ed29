# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Progress for long runs: Ignite's progress bar on a terminal, one readable line per epoch elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

__all__ = ["ProgressHandler"]


class ProgressHandler:
    """Attach Ignite's :class:`~ignite.handlers.ProgressBar` when ``stream`` is a terminal; otherwise (CI,
    ``nohup``, redirected output, where a bar writes one update per step into the file) print one line per epoch:
    ``epoch 3/6: iteration 300/600, loss 0.0912, lmbda 512, 41.2 s (0.137 s/it)``.

    Args:
        output_transform: maps ``engine.state.output`` to a dict of scalars shown (as ``ProgressBar``'s).
        stream: where to write (default ``sys.stderr``, where the bar writes).
        force: ``"bar"`` or ``"lines"`` to choose regardless of the stream; None (default) decides by ``isatty``.
        persist: keep the bar after each epoch (terminal only).
    """

    def __init__(
        self,
        output_transform: Callable[[Any], dict] | None = None,
        stream: TextIO | None = None,
        force: str | None = None,
        persist: bool = False,
    ) -> None:
        if force not in (None, "bar", "lines"):
            raise ValueError(f"force must be None, 'bar' or 'lines', got {force!r}.")
        self.output_transform = output_transform
        self.stream = stream
        self.force = force
        self.persist = persist
        self._epoch_start = 0.0

    def _is_terminal(self) -> bool:
        stream = self.stream or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())

    def attach(self, engine: Engine) -> None:
        if self.force == "bar" or (self.force is None and self._is_terminal()):
            ProgressBar(persist=self.persist).attach(engine, output_transform=self.output_transform)
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._line)

    def _start(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def _line(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._epoch_start
        state = engine.state
        length = state.epoch_length or 1
        total = length * (state.max_epochs or 1)
        parts = [f"epoch {state.epoch}/{state.max_epochs}: iteration {state.iteration}/{total}"]
        values = self.output_transform(state.output) if self.output_transform is not None else {}
        if "lmbda" in state.metrics:
            values = {**values, "lmbda": state.metrics["lmbda"]}
        for key, value in values.items():
            try:
                parts.append(f"{key} {float(value):.4g}")
            except (TypeError, ValueError):
                continue
        parts.append(f"{seconds:.1f} s ({seconds / length:.3f} s/it)")
        print(", ".join(parts), file=self.stream or sys.stderr, flush=True)
