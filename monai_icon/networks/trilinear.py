# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Deprecated path of :mod:`monai_icon.backend.trilinear` (the CPU samplers), kept for existing code; the setting
that turns them on is :class:`monai_icon.backend.CPUBackend` (:func:`monai_icon.backend.use_backend`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from monai_icon.backend import trilinear as _kernels
from monai_icon.backend._legacy import KernelState, one_setting
from monai_icon.backend.trilinear import (
    FAST_TRILINEAR_MIN_POINTS, PLANAR_TRILINEAR_MAX_ROWS, PLANAR_TRILINEAR_MIN_POINTS, fast_trilinear_interpolate,
    planar_trilinear_interpolate, sample, trilinear_interpolate, use_fast_trilinear, use_planar_trilinear,
)

__all__ = [
    "trilinear_interpolate", "planar_trilinear_interpolate", "fast_trilinear_interpolate", "fast_trilinear", "sample",
    "use_fast_trilinear", "use_planar_trilinear", "FAST_TRILINEAR_MIN_POINTS", "PLANAR_TRILINEAR_MIN_POINTS",
    "PLANAR_TRILINEAR_MAX_ROWS",
]

_state = KernelState(_kernels, "fast_sampler")


@contextlib.contextmanager
def fast_trilinear(enabled: bool = True) -> Iterator[None]:
    """The active CPU backend with its ``fast_sampler`` set to ``enabled`` (restored on exit); the same as
    ``use_backend(...)`` with a :class:`~monai_icon.backend.CPUBackend` whose ``fast_sampler`` is ``enabled``."""
    with one_setting("fast_sampler", enabled):
        yield
