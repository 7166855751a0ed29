# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""What the compiled CPU kernels (:mod:`monai_icon.backend.trilinear`'s sampler,
:mod:`monai_icon.backend.lncc_kernels`) need from the machine, and how they run: a C++ compiler, and a bounded
number of compilations per process."""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable, Hashable
from typing import Any

from monai_icon.precision import autocast_disabled

__all__ = ["compiler_available", "run_compiled"]


@functools.lru_cache(maxsize=1)
def compiler_available() -> bool:
    """Inductor's CPU code needs a C++ compiler (``$CXX`` or ``g++`` / ``c++`` / ``clang++`` on the path)."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(c and shutil.which(c) for c in candidates)


def run_compiled(
    state: dict, signatures: set, signature: Hashable, max_signatures: int, compiled: Callable[[], Callable],
    args: tuple, what: str, stacklevel: int = 3,
) -> tuple[bool, Any]:
    """Run a ``torch.compile``'d function on ``args`` (float32 arithmetic: autocast off for the first argument's
    device, one autocast state, so no recompilations), at most for ``max_signatures`` distinct ``signatures``.

    Args:
        state: the caller's compile cache; ``state["failed"]`` is set to the error's ``repr`` when a compilation fails.
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
