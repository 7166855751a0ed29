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
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any


from monai_icon.precision import autocast_disabled

__all__ = ["compiler_available", "enabled_in", "run_compiled", "switched_off"]


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


def run_compiled(
    state: dict, signatures: set, signature: Hashable, max_signatures: int, compiled: Callable[[], Callable],
    args: tuple, what: str, stacklevel: int = 3,
) -> tuple[bool, Any]:
    """Run a ``torch.compile``'d function on ``args`` (float32 arithmetic: autocast off for the first argument's
    device, one autocast state, so no recompilations), at most for ``max_signatures`` distinct ``signatures``.

    Args:
        state: the caller's state; ``state["failed"]`` is set to the error's ``repr`` when a compilation fails.
        signatures: the signatures compiled so far (``signature`` is added after a successful call).
        compiled: returns the compiled function (called only when it is to run).
        what: named in the warning after a failed compilation (e.g. ``"the LNCC ...; computing it eagerly"``).

    Returns:
        ``(True, output)``, or ``(False, None)`` where the caller computes the result itself: an earlier failure,
        a new signature beyond the limit, or a compilation that fails now (warned once, then ``state["failed"]``).
    """
    if state["failed"] is not None or (signature not in signatures and len(signatures) >= max_signatures):
        return False, None
    try:
        with autocast_disabled(args[0].device):
            out = compiled()(*args)
    except Exception as error:  # noqa: BLE001 - any compiler/toolchain failure: the caller's own path from now on
        state["failed"] = repr(error)
        warnings.warn(f"compiling {what.format(error=f'{error!r:.200}')}", RuntimeWarning, stacklevel=stacklevel)
        return False, None
    signatures.add(signature)
    return True, out
