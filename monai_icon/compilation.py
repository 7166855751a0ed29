# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""What the opt-in compiled CPU kernels (:mod:`monai_icon.networks.trilinear`'s sampler,
:mod:`monai_icon.losses.compiled_lncc`) need from the machine."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator

__all__ = ["compiler_available", "enabled_in", "switched_off"]


@functools.lru_cache(maxsize=1)
def compiler_available() -> bool:
    """Inductor's CPU code needs a C++ compiler (``$CXX`` or ``g++`` / ``c++`` / ``clang++`` on the path)."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(c and shutil.which(c) for c in candidates)


def switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` is set to ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


@contextlib.contextmanager
def enabled_in(state: dict, enabled: bool) -> Iterator[None]:
    """Set ``state["enabled"]`` to ``enabled`` within the context and restore its previous value on exit."""
    previous = state["enabled"]
    state["enabled"] = bool(enabled)
    try:
        yield
    finally:
        state["enabled"] = previous
