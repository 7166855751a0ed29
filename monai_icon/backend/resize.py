# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Linear resizing of fields on the CPU as matrix products (the backend's ``matrix_resize``).

Corner-aligned linear interpolation is a product of one 1D interpolation matrix per axis (two nonzero weights per
row); applied axis by axis as matrix products it gives ``F.interpolate(..., align_corners=True)``'s values up to
rounding (closer to a float64 reference than PyTorch's float32 kernel, which places its source points in float32:
5e-7 against 1.2e-5 at 64x32x64 -> 128x64x128) and is faster forward and backward together on a CPU
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from monai_icon.backend.settings import active
from monai_icon.precision import autocast_disabled

__all__ = ["resize", "linear_resize_matrix"]


def linear_resize_matrix(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n_out, n_in]`` weights of corner-aligned 1D linear interpolation: output ``i`` at input position
    ``i (n_in - 1) / (n_out - 1)`` (0 when ``n_out`` is 1), as ``align_corners=True`` places it."""
    position = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
    lower = position.floor().clamp(0, max(n_in - 2, 0)).long()
    weight = position - lower
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix[rows, lower] = 1.0 - weight if n_in > 1 else 1.0
    if n_in > 1:
        matrix[rows, lower + 1] = weight
    return matrix.to(dtype)


@functools.lru_cache(maxsize=64)
def _shared_matrix(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`linear_resize_matrix`, built once per sizes and dtype (a refinement resizes the same fields every
    step); only read, never written. Built outside inference mode, so that autograd may save it later."""
    with torch.inference_mode(False):
        return linear_resize_matrix(n_in, n_out, dtype)


def resize(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor | None:
    """``field`` ``[B, C, *N]`` (1 to 3 spatial axes) linearly resized to ``[B, C, *size]`` with corner-aligned
    grids by matrix products, where the active backend has ``matrix_resize``, the field is on the CPU in float64, or
    in float32 with ``torch.get_float32_matmul_precision() == "highest"`` (a lower precision would compute the
    products in reduced precision), and every value is finite (a product would spread a non-finite value along whole
    rows); under ``torch.autocast`` it stays float32. ``None`` where it does not run: the caller resizes."""
    if not active().matrix_resize or field.device.type != "cpu":
        return None
    if not (field.dtype == torch.float64
            or (field.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")):
        return None
    if not bool(torch.isfinite(field).all()):
        return None
    spatial_dims = field.ndim - 2
    with autocast_disabled(field.device):
        out = field
        batch_channels = out.shape[0] * out.shape[1]
        for axis in reversed(range(spatial_dims)):  # the last axis first: its products need no reshaping
            n_in, n_out = out.shape[2 + axis], int(size[axis])
            if n_in == n_out:
                continue
            matrix = _shared_matrix(n_in, n_out, out.dtype)
            shape = list(out.shape)
            if axis == spatial_dims - 1:
                out = torch.matmul(out, matrix.T)
            else:
                before = batch_channels * math.prod(shape[2:2 + axis])
                out = torch.matmul(matrix, out.reshape(before, n_in, -1))
            shape[2 + axis] = n_out
            out = out.reshape(shape)
    return out
