# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Deprecated path of :mod:`monai_icon.backend.lncc_kernels` (the LNCC's plain and compiled functions), kept for
existing code; the setting that turns the compiled ones on is :class:`monai_icon.backend.CPUBackend`
(:func:`monai_icon.backend.use_backend`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from monai_icon.backend import lncc_kernels as _kernels
from monai_icon.backend._legacy import KernelState, one_setting
from monai_icon.backend.lncc_kernels import (
    COMPILED_LNCC_MIN_VOXELS, compiled_lncc_backward, compiled_lncc_forward, lncc_backward, lncc_forward,
    padded_filtering, use_compiled_lncc,
)

__all__ = [
    "COMPILED_LNCC_MIN_VOXELS", "compiled_lncc", "use_compiled_lncc", "lncc_forward", "lncc_backward",
    "compiled_lncc_forward", "compiled_lncc_backward", "padded_filtering",
]

_state = KernelState(_kernels, "compiled_lncc")


@contextlib.contextmanager
def compiled_lncc(enabled: bool = True) -> Iterator[None]:
    """The active CPU backend with its ``compiled_lncc`` set to ``enabled`` (restored on exit); the same as
    ``use_backend(...)`` with a :class:`~monai_icon.backend.CPUBackend` whose ``compiled_lncc`` is ``enabled``."""
    with one_setting("compiled_lncc", enabled):
        yield
