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

__all__ = ["as_bool"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def as_bool(value: bool | int | str, name: str = "setting") -> bool:
    """``value`` as a bool: ``True``/``False``, ``0``/``1`` or (any case) ``"true"``/``"false"``, ``"yes"``/``"no"``,
    ``"on"``/``"off"``, ``"1"``/``"0"``; anything else is a ``ValueError`` naming ``name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}.")
