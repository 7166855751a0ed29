#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Can trilinear sampling be made cheaper on CPU without changing results? (not part of the test suite)

Most of the 3D overhead of an ICON step on CPU is ``grid_sample`` of the half-resolution displacement fields at
full-resolution points (``docs/benchmarks.md``), and most of that is its backward. This script times, forward +
backward (gradients for the field and the points, as in the inverse consistency term), three ways of doing the
same trilinear sampling with border padding against the library's :func:`monai_icon.networks.maps.interpolate`:

* ``gather``: the eight corners gathered with ``torch.gather`` and weighted, autograd through plain PyTorch ops;
* ``slices-2d-float32`` / ``slices-2d-float64``: the volume's slices stacked into one 2D image and the point
  sampled bilinearly in the two slices around it, then interpolated linearly between them (PyTorch's 2D CPU
  kernel is vectorised, the 3D one is not), in single or double precision;
* ``planar``: the library's form of the same trick
  (:func:`monai_icon.networks.trilinear.planar_trilinear_interpolate`: a power-of-two row scale and
  integer rows, so that no point reaches the neighbouring slice or cell; the two slices as two batch items at
  batch 1), which ``interpolate`` takes by default for large float32 samplings on CPU. ``interpolate`` here is
  PyTorch's ``grid_sample`` (that default switched off).

Errors are the largest absolute differences from the same sampling in float64 (values; gradients relative to
their largest magnitude), next to those of the library's float32 sampling. The gradient with respect to a point
jumps where the point crosses a voxel face, and there float32 rounding may pick either side, so the points
within 1e-4 voxels of a face are left out of the point-gradient error. Times are medians of ``--repeats``
runs after a warm-up, the methods alternated round by round; the ratio is to ``interpolate`` in the same round.

    python benchmarks/grid_sample_bench.py                  # a 3-channel 64x64x32 field at 128x128x64 points
    python benchmarks/grid_sample_bench.py --field 48 48 20 --points 96 96 40
    python benchmarks/grid_sample_bench.py --per-point --field 48 48 20 --points 96 96 40

``--per-point`` instead compares PyTorch's native kernels per point: forward + backward of
:func:`~monai_icon.networks.maps.interpolate` for the 3D field at the jittered 3D points and for a 2D field of as
many pixels (``D`` channels each) at as many jittered 2D points, in nanoseconds per point (the 2D CPU kernel is
vectorised, the 3D one is not).
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from icon_bench import round_times
from monai_icon.losses.inverse_consistency import sample_points
from monai_icon.networks.maps import identity_grid, interpolate
from monai_icon.backend import CPUBackend, use_backend
from monai_icon.backend.trilinear import planar_trilinear_interpolate


def gather_trilinear(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear sampling with border padding by eight ``gather`` s; ``field [B, C, D, H, W]``, ``points
    [B, 3, P]`` in ``[0, 1]`` units (array order); returns ``[B, C, P]``."""
    batch, channels, *size = field.shape
    flat = field.reshape(batch, channels, -1)
    lower, frac = [], []
    for axis, n in enumerate(size):
        c = (points[:, axis] * (n - 1)).clamp(0, n - 1)
        c0 = c.detach().floor().clamp(max=max(n - 2, 0))
        lower.append(c0.long())
        frac.append(c - c0)
    strides = (size[1] * size[2], size[2], 1)
    out = 0.0
    for corner in range(8):
        offsets = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        index = sum((lower[axis] + offsets[axis]).clamp(max=size[axis] - 1) * strides[axis] for axis in range(3))
        weight = 1.0
        for axis in range(3):
            weight = weight * (frac[axis] if offsets[axis] else 1 - frac[axis])
        values = flat.gather(2, index.unsqueeze(1).expand(batch, channels, -1))
        out = out + values * weight.unsqueeze(1)
    return out


def sliced_trilinear(field: torch.Tensor, points: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Trilinear sampling as two bilinear samplings of the stacked slices (``[D * H, W]`` image) in ``dtype``;
    same arguments and result as :func:`gather_trilinear`."""
    batch, channels, depth, height, width = field.shape
    p = points.to(dtype)
    z = (p[:, 0] * (depth - 1)).clamp(0, depth - 1)
    y = (p[:, 1] * (height - 1)).clamp(0, height - 1)
    x = (p[:, 2] * (width - 1)).clamp(0, width - 1)
    z0 = z.detach().floor().clamp(max=max(depth - 2, 0))
    z1 = (z0 + 1).clamp(max=depth - 1)
    rows = torch.stack([z0 * height + y, z1 * height + y], 1)  # [B, 2, P]
    grid_x = (x / max(width - 1, 1) * 2 - 1).unsqueeze(1).expand_as(rows)
    grid_r = rows / (depth * height - 1) * 2 - 1
    grid = torch.stack([grid_x, grid_r], -1).reshape(batch, -1, 1, 2)
    image = field.to(dtype).reshape(batch, channels, depth * height, width)
    v = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    v = v.reshape(batch, channels, 2, -1)
    return (v[:, :, 0] + (z - z0).unsqueeze(1) * (v[:, :, 1] - v[:, :, 0])).to(field.dtype)


def native_interpolate(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """:func:`interpolate` on PyTorch's own ``grid_sample`` (the CPU backend's planar sampler off for the call; its
    split into pseudo-batches kept, as by default)."""
    with use_backend(CPUBackend("off", threaded_sampler=True), field.device):
        return interpolate(field, points)


METHODS = {
    "interpolate": native_interpolate,
    "planar": planar_trilinear_interpolate,
    "gather": gather_trilinear,
    "slices-2d-float32": lambda f, p: sliced_trilinear(f, p, torch.float32),
    "slices-2d-float64": lambda f, p: sliced_trilinear(f, p, torch.float64),
}


def forward_backward(method, field: torch.Tensor, points: torch.Tensor, grad_out: torch.Tensor):
    field = field.detach().requires_grad_()
    points = points.detach().requires_grad_()
    out = method(field, points)
    grad_field, grad_points = torch.autograd.grad(out, (field, points), grad_out)
    return out.detach(), grad_field, grad_points


def alternated_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` in ``repeats`` rounds after one warm-up round, the runs alternated within a
    round (:func:`icon_bench.round_times`), by name."""
    rounds = round_times(list(runs.values()), torch.device("cpu"), 1, repeats)
    return {name: [times[i] for times in rounds] for i, name in enumerate(runs)}


def _square_shape(count: int) -> tuple[int, int]:
    """A 2D shape ``(n, m)`` with ``n * m`` close to ``count`` (``n = round(sqrt(count))``)."""
    side = max(1, round(count**0.5))
    return side, max(1, round(count / side))


def per_point_costs(field_shape: tuple[int, ...], point_shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Forward + backward of :func:`interpolate` (gradients for field and points) per point, in nanoseconds, for
    the 3D ``field_shape`` field at jittered ``point_shape`` points and for a 2D field with as many pixels at as
    many jittered 2D points; medians of ``repeats`` alternated runs after a warm-up."""
    cases = {
        "3D": (field_shape, tuple(point_shape)),
        "2D": (_square_shape(math.prod(field_shape)), _square_shape(math.prod(point_shape))),
    }
    inputs = {}
    for name, (fshape, pshape) in cases.items():
        dims = len(fshape)
        field = torch.randn(1, dims, *fshape) * 0.05
        points = sample_points(pshape, 1, sigma=1.0).reshape(1, dims, -1)  # one voxel of jitter, as in training
        inputs[name] = (field, points, torch.randn(1, dims, points.shape[-1]))
    runs = {name: lambda args=args: forward_backward(METHODS["interpolate"], *args) for name, args in inputs.items()}
    times = alternated_times(runs, repeats)
    return {name: statistics.median(t) / inputs[name][1].shape[-1] * 1e9 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--field", type=int, nargs=3, default=(64, 64, 32), help="field size (half resolution)")
    parser.add_argument("--points", type=int, nargs=3, default=(128, 128, 64), help="grid of jittered points")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-point", action="store_true", help="native 2D against 3D kernel, ns per point")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.per_point:
        costs = per_point_costs(tuple(args.field), tuple(args.points), args.repeats)
        print(f"3D field {'x'.join(map(str, args.field))} at {'x'.join(map(str, args.points))} jittered points and a "
              f"2D field of as many pixels at as many points, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; forward + backward per point")
        for name, ns in costs.items():
            print(f"{name}: {ns:.1f} ns per point")
        print(f"3D / 2D: {costs['3D'] / costs['2D']:.1f}")
        return
    field = torch.randn(1, args.channels, *args.field) * 0.05
    grid = identity_grid(args.points).reshape(1, 3, -1)
    points = grid + torch.randn_like(grid) * 0.01  # about one voxel of jitter, a few points beyond the border
    grad_out = torch.randn(1, args.channels, points.shape[-1])

    reference = forward_backward(METHODS["interpolate"], field.double(), points.double(), grad_out.double())
    voxel = points.double()[0] * torch.tensor([n - 1 for n in args.field], dtype=torch.float64).reshape(3, 1)
    off_faces = ((voxel - voxel.round()).abs() > 1e-4).all(0)  # [P]
    print(f"field {args.channels}x{'x'.join(map(str, args.field))}, {points.shape[-1]:,} points, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; errors against float64 sampling")
    errors = {}
    for name, method in METHODS.items():
        out, grad_field, grad_points = forward_backward(method, field, points, grad_out)
        errors[name] = [
            (out.double() - reference[0]).abs().max().item(),
            ((grad_field.double() - reference[1]).abs().max() / reference[1].abs().max()).item(),
            ((grad_points.double() - reference[2])[..., off_faces].abs().max() / reference[2].abs().max()).item(),
        ]
    runs = {name: lambda m=method: forward_backward(m, field, points, grad_out) for name, method in METHODS.items()}
    times = alternated_times(runs, args.repeats)
    base = times["interpolate"]
    print("| method | forward + backward [s] | / interpolate | value error | field-gradient error "
          "| point-gradient error |")
    print("|---|---|---|---|---|---|")
    for name in METHODS:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        err = " | ".join(f"{e:.1e}" for e in errors[name])
        print(f"| {name} | {statistics.median(times[name]):.3f} | {ratio:.2f} | {err} |")


if __name__ == "__main__":
    main()
