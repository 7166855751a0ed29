# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Atomic checkpoints and finding the checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "require_file"]


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` whose files are written atomically: serialised to a temporary file in
    the same folder, then renamed (Ignite's ``DiskSaver(atomic=True)``). A run killed while saving leaves the
    previous checkpoint intact instead of a truncated file (MONAI's saver writes in place). Same arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True


def latest_checkpoint(directory: str | Path, pattern: str = "*.pt") -> str | None:
    """The most recently written file matching ``pattern`` in ``directory``, or None if there is none.

    ``CheckpointSaver`` writes atomically (temporary file, then rename), so a run killed while saving leaves
    the previous checkpoint intact and this returns a complete file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    files = [p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    return str(max(files, key=lambda p: p.stat().st_mtime_ns)) if files else None


def require_file(path: str | Path, hint: str = "") -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` naming it (and what to do)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"required file not found: {path}" + (f" ({hint})" if hint else ""))
    return str(path)
