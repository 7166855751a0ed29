# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Trilinear interpolation of a 3D field at arbitrary points on the CPU: the kernels behind :func:`sample`, the hook
that :func:`monai_icon.networks.maps.interpolate` calls.

PyTorch's CPU ``grid_sample`` vectorises its 2D kernel only; its 3D kernel is scalar code, and on the T1-head recipe
it is the largest single cost of a training step and of the refinement (``docs/benchmarks.md``). Two replacements:

- :func:`fast_trilinear_interpolate`: the interpolation written with gathers (:func:`trilinear_interpolate`, plain
  PyTorch, any device, differentiable with respect to the field and the points) and compiled by Inductor, several
  times faster for an image warp (forward and backward with respect to the points). Taken where
  :func:`use_fast_trilinear` allows it: when the active CPU backend has ``fast_sampler``
  (:func:`monai_icon.backend.use_backend`).
- :func:`planar_trilinear_interpolate`: no compiler; the field's slices, stacked into one 2D image, sampled by
  PyTorch's vectorised 2D ``grid_sample`` kernel, the two slices around each point blended. Taken where
  :func:`use_planar_trilinear` allows it (the backend's ``planar_sampler``, on by default), fields with gradients
  included.

Conventions are those of :mod:`monai_icon.networks.maps`: points in ``[0, 1]`` units, channel ``d`` along the
field's axis ``2 + d``, ``0`` and ``1`` on the first and last voxel centres, and outside ``[0, 1]`` the value at the
nearest border point (``grid_sample``'s ``padding_mode="border"``, ``align_corners=True``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.utils import convert_to_dst_type

from monai_icon.backend.compilation import compiler_available as _compiler_available
from monai_icon.backend.compilation import run_compiled
from monai_icon.backend.settings import active

__all__ = [
    "trilinear_interpolate", "planar_trilinear_interpolate", "fast_trilinear_interpolate", "sample",
    "use_fast_trilinear", "use_planar_trilinear", "FAST_TRILINEAR_MIN_POINTS", "PLANAR_TRILINEAR_MIN_POINTS",
    "PLANAR_TRILINEAR_MAX_ROWS", "chunked_grid_sample",
]

#: Fewer points than this are left to ``grid_sample``: the compiled loop pays off on large samplings (an image warp,
#: a regulariser's points), and small calls (unit tests, 2D-sized work) then never wait for a compilation.
FAST_TRILINEAR_MIN_POINTS = 65536
#: :func:`planar_trilinear_interpolate` is taken from this many points per field (below, ``grid_sample`` is as fast).
PLANAR_TRILINEAR_MIN_POINTS = 16384
#: ... and for fields of at most this many voxels in their first two axes (``N0 N1``), which bounds its rounding
#: along axis 1 by ``2^-10`` voxels in float32.
PLANAR_TRILINEAR_MAX_ROWS = 2**14 + 1
#: At most this many distinct input signatures (shapes, gradient requirements, grad mode) are compiled per process;
#: further ones use ``grid_sample`` (past its own limit of 8, Dynamo would run the slower eager gathers instead).
_MAX_SIGNATURES = 6

#: the compile cache of this process: the compiled function, the signatures compiled, an earlier failure
_state: dict[str, Any] = {"compiled": None, "signatures": set(), "failed": None}


def trilinear_interpolate(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of ``field`` at ``points``, border-padded.

    Args:
        field: ``[B, C, N0, N1, N2]`` values on the voxel grid, every ``N_d >= 2``.
        points: ``[B, 3, P]`` coordinates in ``[0, 1]`` units (channel ``d`` along axis ``N_d``).

    Returns:
        ``[B, C, P]``: the values of ``grid_sample(..., mode="bilinear", padding_mode="border",
        align_corners=True)`` (up to float rounding), differentiable with respect to ``field`` and ``points``.
        Outside ``(0, 1)`` a coordinate is clamped, with no gradient along it (on the border planes too, as in
        ``grid_sample``). Voxel positions are computed with ``grid_sample``'s arithmetic (from the ``[-1, 1]``
        coordinate ``2 x - 1``), so that at points on inner voxel planes (the identity grid, a map sampled on its
        own grid) the derivative is ``grid_sample``'s one-sided one, that of the cell above.
    """
    batch, channels, n0, n1, n2 = field.shape
    axes = [_axis_weights(points[:, d], n) for d, n in enumerate((n0, n1, n2))]
    flat = field.reshape(batch, channels, n0 * n1 * n2)
    out = torch.zeros((), dtype=field.dtype, device=field.device)
    for i0, w0 in zip(*axes[0]):
        for i1, w1 in zip(*axes[1]):
            for i2, w2 in zip(*axes[2]):
                index = ((i0 * n1 + i1) * n2 + i2).unsqueeze(1).expand(batch, channels, -1)
                term = torch.gather(flat, 2, index) * (w0 * w1 * w2).unsqueeze(1)
                out = out + term
    return out


def _axis_weights(
    coordinate: torch.Tensor, size: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One axis of the interpolation: the indices of the two neighbouring voxels of each point (``[B, P]`` each,
    the lower one in ``[0, N - 2]``) and their weights (differentiable with respect to the coordinate)."""
    position = _axis_position(coordinate, size)
    lower = position.detach().floor().clamp(max=size - 2)
    fraction = position - lower
    low = lower.long()
    return (low, low + 1), (1 - fraction, fraction)


def _axis_position(coordinate: torch.Tensor, size: int) -> torch.Tensor:
    """A ``[0, 1]`` coordinate in voxel units along an axis of ``size`` voxels, clamped to ``[0, size - 1]``."""
    # voxel units as grid_sample computes them (align_corners=True); border padding clamps them to the grid, and like
    # grid_sample the border planes themselves count as outside: no gradient along the axis there
    position = ((coordinate * 2.0 - 1.0) + 1.0) / 2.0 * (size - 1)
    inside = (position > 0) & (position < size - 1)
    return torch.where(inside, position, position.detach().clamp(0, size - 1))


def planar_trilinear_interpolate(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of ``field`` at ``points`` (border-padded) as two bilinear samplings of one 2D image,
    by PyTorch's vectorised 2D ``grid_sample`` kernel (no compilation).

    The field's slices along axis 0 are stacked into a ``[B, C, N0 N1, N2]`` image (a view, plus zero rows up to a
    height of ``2^k + 1``); each point is sampled bilinearly in the two slices around it (rows ``i0 N1 + y`` and
    ``(i0 + 1) N1 + y``, columns ``z``) and the two values are blended linearly along axis 0. The rows' normalised
    coordinates have a power-of-two scale, so integer rows (voxel planes of axis 1) convert exactly, and each row's
    fraction is kept one float step below 1: every point is read in ``grid_sample``'s own cell, never in a row of the
    neighbouring slice, so these are ``grid_sample``'s values and gradients up to float rounding, including its
    one-sided derivatives on voxel planes and zero gradient on the border planes. The rounding along axis 1 is that
    of a coordinate in ``[0, 2^k]`` (``2^k >= N0 N1 - 1``): a position may be off by up to ``2^(k - 24)`` voxels
    along axis 1 in float32 (``4.9e-4`` voxels for ``N0 N1 = 8192``; ``grid_sample``'s own about ``N1 2^-24``).

    Args:
        field: ``[B, C, N0, N1, N2]``, every ``N_d >= 2``; float32 or float64 (any device ``grid_sample`` runs on).
        points: ``[B, 3, P]`` coordinates in ``[0, 1]`` units, the field's dtype.

    Returns:
        ``[B, C, P]``, differentiable with respect to ``field`` and ``points``.
    """
    batch, channels, n0, n1, n2 = field.shape
    (lower0, _), (weight_low, weight_high) = _axis_weights(points[:, 0], n0)
    rows_used = n0 * n1
    height = 2 ** max(1, math.ceil(math.log2(rows_used - 1))) + 1
    image = field.reshape(batch, channels, rows_used, n2)
    if height > rows_used:  # rows never sampled with a nonzero weight: the scale (height - 1) / 2 a power of two
        image = F.pad(image, (0, 0, 0, height - rows_used))
    # the row in slice i0: its integer part exact (the last row itself for points on the top plane, whose next row
    # gets weight 0), its fraction kept one float step u = (height - 1) eps / 2 of the row coordinate below 1
    # (straight-through): then no rounding on the way through grid_sample's normalised coordinate, whose scale is a
    # power of two, moves a point into the cell above (or into the next slice)
    position1 = _axis_position(points[:, 1], n1)
    lower1 = position1.detach().floor()
    fraction1 = position1 - lower1
    cap = 1.0 - (height - 1) * torch.finfo(points.dtype).eps / 2
    fraction1 = fraction1 - (fraction1 - fraction1.clamp(max=cap)).detach()
    row = (lower0.to(points.dtype) * n1 + lower1) + fraction1  # [B, P]
    rows = torch.stack([row, row + n1], 1) * (2.0 / (height - 1)) - 1.0  # [B, 2, P]: slices i0 and i0 + 1
    column = (points[:, 2] * 2.0 - 1.0).unsqueeze(1).expand_as(rows)  # the x-first coordinate, as interpolate's
    grid = torch.stack([column, rows], -1)  # [B, 2, P, 2]
    if batch == 1 and field.device.type == "cpu" and torch.get_num_threads() > 1:
        # the CPU kernel parallelises over the batch only: the two slices' samplings as two items of one image
        both = F.grid_sample(image.expand(2, -1, -1, -1), grid.transpose(0, 1), mode="bilinear",
                             padding_mode="border", align_corners=True).transpose(0, 2)  # [1, C, 2, P]
    else:
        both = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)  # [B, C, 2, P]
    return both[:, :, 0] * weight_low.unsqueeze(1) + both[:, :, 1] * weight_high.unsqueeze(1)


def use_fast_trilinear(field: torch.Tensor, points: torch.Tensor, mode: str, padding_mode: str) -> bool:
    """Whether :func:`~monai_icon.networks.maps.interpolate` takes :func:`fast_trilinear_interpolate`: with the
    active CPU backend's ``fast_sampler`` (:func:`monai_icon.backend.use_backend`), for a 3D float32 CPU field with
    every axis >= 2 that needs no gradient (an image; fields with gradients take :func:`planar_trilinear_interpolate`,
    which needs no compilation), linear interpolation with border padding, at least
    :data:`FAST_TRILINEAR_MIN_POINTS` points per field, outside ``torch.compile`` (a compiled caller fuses the
    sampling itself), with a C++ compiler available and no earlier compilation failure in this process."""
    if not active().fast_sampler or field.requires_grad:
        return False
    if not _cpu_border_sampling(field, points, mode, padding_mode, FAST_TRILINEAR_MIN_POINTS):
        return False
    return _state["failed"] is None and _compiler_available()


def use_planar_trilinear(field: torch.Tensor, points: torch.Tensor, mode: str, padding_mode: str) -> bool:
    """Whether :func:`~monai_icon.networks.maps.interpolate` takes :func:`planar_trilinear_interpolate` (when the
    compiled sampler does not apply): with the active CPU backend's ``planar_sampler`` (on by default), a 3D float32
    CPU field with every axis >= 2 and at most :data:`PLANAR_TRILINEAR_MAX_ROWS` voxels in its first two axes
    together (its rounding along axis 1 then stays within ``2^-10`` voxels), linear interpolation with border
    padding, at least :data:`PLANAR_TRILINEAR_MIN_POINTS` points per field, outside ``torch.compile``. It needs no
    compilation and is faster than ``grid_sample``'s scalar 3D kernel where it is taken (``docs/benchmarks.md``)."""
    if not active().planar_sampler:
        return False
    if field.ndim == 5 and field.shape[2] * field.shape[3] > PLANAR_TRILINEAR_MAX_ROWS:
        return False
    return _cpu_border_sampling(field, points, mode, padding_mode, PLANAR_TRILINEAR_MIN_POINTS)


def _cpu_border_sampling(
    field: torch.Tensor, points: torch.Tensor, mode: str, padding_mode: str, min_points: int
) -> bool:
    """What both samplers need: a 3D float32 CPU field with every axis >= 2 and float32 points, linear interpolation
    with border padding, at least ``min_points`` points per field, outside ``torch.compile`` (a compiled caller fuses
    the sampling itself)."""
    if (field.ndim != 5 or mode != "bilinear" or padding_mode != "border" or field.device.type != "cpu"
            or field.dtype != torch.float32 or points.dtype != torch.float32 or min(field.shape[2:]) < 2):
        return False
    return points[0, 0].numel() >= min_points and not torch.compiler.is_compiling()


def _compiled() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(trilinear_interpolate, dynamic=False)
    return _state["compiled"]


def _run_fast(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor | None:
    """The compiled sampler's result, or ``None`` where it did not run (a signature beyond the first six in a
    process, or a compilation that failed: warned once, then never tried again)."""
    signature = (tuple(field.shape), tuple(points.shape), field.requires_grad, points.requires_grad,
                 torch.is_grad_enabled())
    # plain tensors in (Dynamo cannot trace MONAI's MetaTensor and would run the slow eager gathers); a MetaTensor
    # field gives a MetaTensor with its metadata, as grid_sample would
    ran, out = run_compiled(_state, _state["signatures"], signature, _MAX_SIGNATURES, _compiled,
                            (_plain(field), _plain(points)),
                            "the trilinear sampler failed ({error}); using grid_sample.", stacklevel=4)
    if not ran:
        return None
    return convert_to_dst_type(out, field)[0] if isinstance(field, MetaTensor) else out


def fast_trilinear_interpolate(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """:func:`trilinear_interpolate` compiled by Inductor (one compilation per input signature, kept on disk by
    PyTorch's cache for later processes). Falls back to ``grid_sample`` (the same values) for signatures beyond
    the first six in a process, and for good once a compilation fails (with a warning)."""
    out = _run_fast(field, points)
    return _grid_sample(field, points) if out is None else out


_MIN_POINTS_PER_CHUNK = 4096


def _cpu_chunks(field: torch.Tensor, num_points: int) -> int:
    """How many pseudo-batches to split the points into so that ``grid_sample`` uses every CPU thread.

    PyTorch's CPU ``grid_sample`` parallelises over the batch only (in 3D), so a batch smaller than the thread
    count leaves cores idle. 1 on other devices, whose kernels parallelise over points.
    """
    if field.device.type != "cpu" or torch.compiler.is_compiling():  # compiled code has its own parallel loops
        return 1
    threads = torch.get_num_threads()
    batch = field.shape[0]
    if batch >= threads:
        return 1
    return max(1, min(threads // batch, num_points // _MIN_POINTS_PER_CHUNK))


def chunked_grid_sample(
    field: torch.Tensor, grid: torch.Tensor, chunks: int, mode: str, padding_mode: str
) -> torch.Tensor:
    """``grid_sample`` of ``grid`` (``[B, P, D]``) split into ``chunks`` pseudo-batches; returns ``[B, C, P]``.

    Values are identical to one call; gradients with respect to ``field`` are summed over the chunks (equal up to
    floating-point summation order).
    """
    batch, num_points, dims = grid.shape
    per_chunk = -(-num_points // chunks)
    pad = per_chunk * chunks - num_points
    if pad:
        grid = torch.cat([grid, grid.new_zeros(batch, pad, dims)], dim=1)
    grid = grid.reshape(batch * chunks, per_chunk, *([1] * (dims - 1)), dims)
    fields = field.unsqueeze(1).expand(batch, chunks, *field.shape[1:]).reshape(batch * chunks, *field.shape[1:])
    values = F.grid_sample(fields, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    values = values.reshape(batch, chunks, field.shape[1], per_chunk).transpose(1, 2)
    return values.reshape(batch, field.shape[1], chunks * per_chunk)[..., :num_points]


def sample(field: torch.Tensor, points: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor | None:
    """The CPU backend's hook in :func:`monai_icon.networks.maps.interpolate`: ``field`` ``[B, C, *N]`` at
    ``points`` ``[B, D, P]`` by the compiled sampler (:func:`use_fast_trilinear`), the planar one
    (:func:`use_planar_trilinear`) or, with the active backend's ``threaded_sampler``, by ``grid_sample`` split into
    pseudo-batches that keep every CPU thread busy (:func:`chunked_grid_sample`), ``[B, C, P]``; ``None`` ("not
    run") where none applies or the compiled one did not run, and the caller samples with ``grid_sample`` itself."""
    if use_fast_trilinear(field, points, mode, padding_mode):
        out = _run_fast(field, points)
        if out is not None:
            return out
    if use_planar_trilinear(field, points, mode, padding_mode):
        return planar_trilinear_interpolate(field, points)
    chunks = _cpu_chunks(field, points.shape[-1]) if active().threaded_sampler else 1
    if chunks > 1:
        grid = points.flip(1).movedim(1, -1) * 2.0 - 1.0  # [B, P, D]: grid_sample's order, in [-1, 1]
        return chunked_grid_sample(field, grid, chunks, mode, padding_mode)
    return None


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _grid_sample(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` with this module's conventions (``points`` ``[B, 3, P]`` in ``[0, 1]``, border padding,
    corners aligned): the values :func:`monai_icon.networks.maps.interpolate` gives without a backend."""
    grid = (points.flip(1).movedim(1, -1) * 2.0 - 1.0).reshape(points.shape[0], -1, 1, 1, 3)
    values = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return values.reshape(field.shape[0], field.shape[1], -1)
