# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Reading settings that come from bundle configs and command lines.

``python -m monai.bundle run ... --resume false`` passes the *string* ``"false"`` (the command line is parsed by
``fire``, which only knows ``False``), and a non-empty string is true in Python: without a check, ``--resume
false`` would silently resume. Configs pass their yes/no settings through :func:`as_bool`.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.utils import str2bool

__all__ = ["as_bool", "as_count", "choose", "cuda_amp"]


def as_bool(value: bool | int | str, name: str = "setting") -> bool:
    """``value`` as a bool, by ``monai.utils.str2bool``: ``True``/``False``, ``0``/``1`` or (any case, surrounding
    blanks ignored) ``"true"``/``"false"``, ``"yes"``/``"no"``, ``"t"``/``"f"``, ``"y"``/``"n"``, ``"1"``/``"0"``;
    anything else is a ``ValueError`` naming ``name``."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = str(value).strip()
    try:
        return str2bool(value)
    except ValueError:
        raise ValueError(f"{name} must be true or false, got {value!r}.") from None


def as_count(value: int | str, name: str = "setting", minimum: int = 1) -> int:
    """``value`` as an integer ``>= minimum`` (an int or a string of one, e.g. from a command line); anything else
    (a bool, a fraction, a smaller number, text) is a ``ValueError`` naming ``name``."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if text is None or not text.lstrip("+-").isdigit() or int(text) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(text)


def cuda_amp(value: bool | int | str, device: str | torch.device) -> bool:
    """Whether GPU mixed precision runs: the bundles' ``amp`` setting (read by :func:`as_bool`) on a CUDA
    ``device`` (a ``torch.device`` or its name, e.g. ``"cuda:0"``); always ``False`` on other devices, so that a
    config with ``amp: true`` runs unchanged, in float32, on CPU (bfloat16 on CPU is the separate ``cpu_amp``
    setting of :class:`~monai_icon.engines.ICONTrainer`). The value goes to the ``amp`` argument of MONAI's
    ``SupervisedTrainer`` / ``SupervisedEvaluator`` (float16 autocast, and gradient scaling in training)."""
    return as_bool(value, "amp") and torch.device(device).type == "cuda"


def choose(value: str, name: str, **options: Any) -> Any:
    """``options[value]``: pick one of several config objects by a setting's name, e.g. the lambda handler by
    ``lmbda_schedule``; anything else is a ``ValueError`` naming ``name`` and the choices."""
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}.")
    return options[value]
