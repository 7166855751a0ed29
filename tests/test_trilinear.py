# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The gather-based trilinear sampler against ``grid_sample``: values and gradients (plain and compiled), where
``interpolate`` takes it, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import activate_backend

from monai_icon.backend import trilinear as kernels
from monai_icon.networks import maps, trilinear
from monai_icon.networks.maps import interpolate
from monai_icon.networks.trilinear import (
    FAST_TRILINEAR_MIN_POINTS, PLANAR_TRILINEAR_MAX_ROWS, PLANAR_TRILINEAR_MIN_POINTS, fast_trilinear,
    fast_trilinear_interpolate, planar_trilinear_interpolate, trilinear_interpolate, use_fast_trilinear,
    use_planar_trilinear,
)

needs_compiler = pytest.mark.skipif(not kernels._compiler_available(), reason="no C++ compiler for Inductor")


def reference(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` (border, align_corners) at ``[B, 3, P]`` points in ``[0, 1]`` units: ``[B, C, P]``."""
    grid = points.flip(1).movedim(1, -1).reshape(points.shape[0], -1, 1, 1, 3) * 2.0 - 1.0
    values = F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return values.reshape(field.shape[0], field.shape[1], -1)


def random_points(batch: int, num: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Points in [-0.2, 1.2]^3 (a fifth of each axis outside the grid), away from cell boundaries' float ties."""
    return torch.rand(batch, 3, num, generator=generator, dtype=dtype) * 1.4 - 0.2


def values_and_grads(fn, field, points):
    field = field.clone().requires_grad_(True)
    points = points.clone().requires_grad_(True)
    out = fn(field, points)
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)  # not a plain sum
    (out * weights).sum().backward()
    return out.detach(), field.grad, points.grad


@pytest.mark.parametrize("shape", [(5, 7, 6), (2, 2, 2), (9, 4, 3)])
def test_plain_sampler_equals_grid_sample_in_float64(shape):
    g = torch.Generator().manual_seed(0)
    field = torch.randn(2, 3, *shape, generator=g, dtype=torch.float64)
    points = random_points(2, 500, g)
    ours, theirs = values_and_grads(trilinear_interpolate, field, points), values_and_grads(reference, field, points)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_plain_sampler_is_exact_on_grid_points_and_linear_along_an_axis():
    field = torch.arange(4 * 5 * 6, dtype=torch.float64).reshape(1, 1, 4, 5, 6)  # linear in every index
    index = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (4, 5, 6)), indexing="ij")).reshape(1, 3, -1)
    points = (index / torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64).reshape(1, 3, 1)).requires_grad_(True)
    values = trilinear_interpolate(field, points)
    torch.testing.assert_close(values.reshape(-1), field.reshape(-1))
    # d value / d point = (voxel steps per unit) * (index stride) off the border planes (there 0, as grid_sample)
    inside = ((index[0] > 0) & (index[0] < torch.tensor([3, 4, 5]).reshape(3, 1))).all(0)
    values.sum().backward()
    expected = torch.tensor([3.0 * 30, 4.0 * 6, 5.0 * 1], dtype=torch.float64).reshape(3, 1)
    torch.testing.assert_close(points.grad[0][:, inside], expected.expand(3, int(inside.sum())))


def test_clamped_coordinates_give_border_values_and_no_gradient_along_them():
    field = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    points = torch.tensor([[[1.5], [0.5], [-0.7]]], dtype=torch.float64, requires_grad=True)
    value = trilinear_interpolate(field, points)
    inside = torch.tensor([[[1.0], [0.5], [0.0]]], dtype=torch.float64)
    torch.testing.assert_close(value, trilinear_interpolate(field, inside))
    value.sum().backward()
    assert points.grad[0, 0, 0] == 0 and points.grad[0, 2, 0] == 0


@needs_compiler
@pytest.mark.parametrize("field_grad", [False, True])
def test_compiled_sampler_equals_grid_sample_in_float32(field_grad):
    g = torch.Generator().manual_seed(1)
    field = torch.randn(2, 2, 12, 10, 14, generator=g)
    points = random_points(2, 3000, g, torch.float32)

    def run(fn):
        f = field.clone().requires_grad_(field_grad)
        p = points.clone().requires_grad_(True)
        out = fn(f, p)
        (out * torch.linspace(-1.0, 2.0, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), p.grad, f.grad

    ours, theirs = run(fast_trilinear_interpolate), run(reference)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-3)
    if field_grad:
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-5)


def fresh_state(monkeypatch, enabled: bool = False) -> None:
    """This test's own compile cache (no signatures, no earlier failure in the session), the compiled sampler
    ``enabled`` outside any context."""
    monkeypatch.setattr(kernels, "_state", {"compiled": None, "signatures": set(), "failed": None})
    activate_backend(monkeypatch, fast_sampler=enabled)


def assert_refuses_what_neither_sampler_takes(policy, field, points):
    """``policy`` accepts ``(field, points)`` (the smallest point count it takes) but no fewer points, another mode or
    padding, float64, an axis of one voxel or a 2D field."""
    assert policy(field, points, "bilinear", "border")
    assert not policy(field, points[..., :-1], "bilinear", "border")  # too few points
    assert not policy(field, points, "nearest", "border")
    assert not policy(field, points, "bilinear", "zeros")
    assert not policy(field.double(), points.double(), "bilinear", "border")
    assert not policy(torch.zeros(1, 1, 64, 1, 64), points, "bilinear", "border")
    assert not policy(torch.zeros(1, 1, 256, 256), points[:, :2], "bilinear", "border")


def test_interpolate_takes_the_fast_sampler_only_where_it_pays(monkeypatch):
    fresh_state(monkeypatch)
    monkeypatch.setattr(kernels, "_compiler_available", lambda: True)
    image = torch.zeros(1, 1, 64, 32, 64)
    points = torch.zeros(1, 3, FAST_TRILINEAR_MIN_POINTS)
    assert not use_fast_trilinear(image, points, "bilinear", "border")  # opt-in only
    with fast_trilinear():
        assert use_fast_trilinear(image, points, "bilinear", "border")
        with fast_trilinear(False):
            assert not use_fast_trilinear(image, points, "bilinear", "border")
        assert use_fast_trilinear(image, points, "bilinear", "border")  # restored
    assert not use_fast_trilinear(image, points, "bilinear", "border")
    activate_backend(monkeypatch, fast_sampler=True)
    assert not use_fast_trilinear(image.requires_grad_(True), points, "bilinear", "border")  # a field with grads
    image = image.detach()
    assert_refuses_what_neither_sampler_takes(use_fast_trilinear, image, points)
    activate_backend(monkeypatch, fast_sampler=False)
    assert not use_fast_trilinear(image, points, "bilinear", "border")
    activate_backend(monkeypatch, fast_sampler=True)
    monkeypatch.setattr(kernels, "_compiler_available", lambda: False)
    assert not use_fast_trilinear(image, points, "bilinear", "border")


@needs_compiler
def test_interpolate_of_a_large_image_matches_grid_sample_both_ways(monkeypatch):
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 1, 32, 24, 40, generator=g)
    points = (maps.identity_grid((64, 32, 64)) + 0.03 * torch.randn(2, 3, 64, 32, 64, generator=g))
    points.requires_grad_(True)
    fresh_state(monkeypatch, enabled=True)
    assert use_fast_trilinear(image, points.reshape(2, 3, -1), "bilinear", "border")
    calls = []
    run_fast = kernels._run_fast  # the compiled sampler, as interpolate's backend runs it
    monkeypatch.setattr(kernels, "_run_fast", lambda *args: calls.append(1) or run_fast(*args))
    fast = interpolate(image, points)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), points)
    activate_backend(monkeypatch, fast_sampler=False, planar_sampler=False)  # grid_sample itself
    slow = interpolate(image, points)
    (grad_slow,) = torch.autograd.grad(slow.square().sum(), points)
    assert calls == [1] and fast.shape == (2, 1, 64, 32, 64)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-4, atol=1e-3)


def test_a_failed_compilation_warns_once_and_falls_back_to_grid_sample(monkeypatch):
    fresh_state(monkeypatch, enabled=True)

    def broken(*args):
        raise RuntimeError("no toolchain")

    monkeypatch.setattr(kernels, "_compiled", lambda: broken)
    field, points = torch.randn(1, 2, 4, 5, 6), torch.rand(1, 3, 50)
    with pytest.warns(RuntimeWarning, match="no toolchain"):
        out = fast_trilinear_interpolate(field, points)
    torch.testing.assert_close(out, reference(field, points))
    assert "no toolchain" in trilinear._state["failed"]
    assert not use_fast_trilinear(torch.zeros(1, 1, 64, 32, 64), torch.zeros(1, 3, 2**17), "bilinear", "border")


def test_signatures_beyond_the_limit_use_grid_sample(monkeypatch):
    fresh_state(monkeypatch, enabled=True)
    monkeypatch.setattr(kernels, "_MAX_SIGNATURES", 0)
    monkeypatch.setattr(kernels, "_compiled", lambda: pytest.fail("compiled beyond the limit"))
    field, points = torch.randn(1, 1, 4, 5, 6), torch.rand(1, 3, 20)
    torch.testing.assert_close(fast_trilinear_interpolate(field, points), reference(field, points))


@needs_compiler
def test_compiled_sampler_takes_metatensors_and_keeps_their_metadata():
    from monai.data import MetaTensor

    field = MetaTensor(torch.randn(1, 1, 6, 5, 7), meta={"filename_or_obj": "x.nii.gz"})
    points = torch.rand(1, 3, 300, requires_grad=True)
    out = fast_trilinear_interpolate(field, points)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.nii.gz"
    torch.testing.assert_close(out.as_tensor(), reference(field.as_tensor(), points.detach()), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert points.grad is not None and torch.isfinite(points.grad).all()


@pytest.mark.parametrize("fast_sampler", [False, True])
def test_trainer_samples_inside_the_fast_context_only_when_asked(fast_sampler):
    from conftest import assert_trainer_iterates_inside_a_context_only_when_asked

    assert_trainer_iterates_inside_a_context_only_when_asked("fast_sampler", fast_sampler, trilinear._state)


@pytest.mark.parametrize("compiled", [False, True, "planar"])
def test_gradients_on_voxel_planes_are_grid_samples_one_sided_ones(compiled):
    """On the identity grid (a map sampled on its own grid, the start of every refinement) every point lies on voxel
    planes, where the interpolant has kinks: the derivative must be the one grid_sample takes (the cell above; none
    on the border planes)."""
    if compiled is True and not kernels._compiler_available():
        pytest.skip("no C++ compiler for Inductor")
    g = torch.Generator().manual_seed(5)
    field = torch.randn(2, 1, 7, 5, 9, generator=g) ** 2  # kinks at every voxel plane
    points = maps.identity_grid((7, 5, 9)).reshape(1, 3, -1).expand(2, 3, -1).contiguous()
    fn = {False: trilinear_interpolate, True: fast_trilinear_interpolate,
          "planar": planar_trilinear_interpolate}[compiled]
    ours, theirs = values_and_grads(fn, field, points), values_and_grads(reference, field, points)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shape", [(5, 7, 6), (2, 2, 2), (9, 4, 3), (3, 11, 2)])
def test_planar_sampler_equals_grid_sample_in_float64(shape, batch):
    g = torch.Generator().manual_seed(6)
    field = torch.randn(batch, 3, *shape, generator=g, dtype=torch.float64)
    points = random_points(batch, 700, g)
    threads = torch.get_num_threads()
    try:
        for n in {1, 2}:  # batch 1 on several threads samples the two slices as two items
            torch.set_num_threads(n)
            ours = values_and_grads(planar_trilinear_interpolate, field, points)
            for a, b in zip(ours, values_and_grads(reference, field, points)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


def test_planar_sampler_in_float32_stays_within_its_rounding_bound():
    """Rows of a 64 x 128 slice stack: the rounding along axis 1 is that of a coordinate in [0, 8192] (2^-10 voxels
    at most, with the fraction's cap); values and gradients as grid_sample's to that order."""
    g = torch.Generator().manual_seed(7)
    field = torch.randn(2, 3, 64, 128, 5, generator=g)
    points = random_points(2, 20000, g, dtype=torch.float32)
    ours, theirs = values_and_grads(planar_trilinear_interpolate, field, points), values_and_grads(reference, field,
                                                                                                   points)
    step = (field.diff(dim=3).abs().max()).item()  # the largest change of the field between neighbouring rows
    assert (ours[0] - theirs[0]).abs().max() <= 2.0**-10 * step + 1e-5
    # field gradients: each point's weights to within its rounded fraction (2^-11 here) times its output's weight (<= 2)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=4 * 2.0**-11 * 2)
    # point gradients: the same cell for every point (differences only from the rounded fraction)
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-3, atol=2e-3 * theirs[2].abs().max().item())


def test_planar_sampler_keeps_a_point_just_below_a_slice_top_in_its_slice():
    """A float32 position a hair below the last row of a slice (and below an inner voxel plane) must keep the cell
    below: rounded onto the plane it would read the next slice's first row (or the cell above)."""
    field = torch.zeros(1, 1, 4, 2048, 2)
    field[:, :, 1, 0] = 100.0  # the first row of slice 1: must not leak into points of slice 0
    field[:, :, 0, -1] = 1.0
    top = 1.0 - 2.0**-24  # the largest float32 below 1: just below the top plane of slice 0
    inner = torch.nextafter(torch.tensor(1023 / 2047), torch.tensor(0.0)).item()  # just below an inner plane
    points = torch.tensor([[[0.0, 0.0], [top, inner], [0.3, 0.3]]], requires_grad=True)
    values = planar_trilinear_interpolate(field, points)
    expected = reference(field, points.detach())
    torch.testing.assert_close(values, expected, rtol=0, atol=2e-3)
    (grad,) = torch.autograd.grad(values.sum(), points)
    (expected_grad,) = torch.autograd.grad(reference(field, points).sum(), points)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-3)


def test_interpolate_takes_the_planar_sampler_by_default_where_it_applies(monkeypatch):
    fresh_state(monkeypatch)
    field = torch.zeros(1, 3, 64, 32, 64, requires_grad=True)  # fields with gradients too
    points = torch.zeros(1, 3, PLANAR_TRILINEAR_MIN_POINTS)
    assert use_planar_trilinear(field, points, "bilinear", "border")
    assert_refuses_what_neither_sampler_takes(use_planar_trilinear, field, points)
    rows = PLANAR_TRILINEAR_MAX_ROWS // 64 + 1  # past the rounding bound: grid_sample
    assert not use_planar_trilinear(torch.zeros(1, 1, 64, rows, 4), points, "bilinear", "border")
    activate_backend(monkeypatch, planar_sampler=False)
    assert not use_planar_trilinear(field, points, "bilinear", "border")
    activate_backend(monkeypatch, planar_sampler=True)

    calls = []
    monkeypatch.setattr(kernels, "planar_trilinear_interpolate",
                        lambda *args: calls.append(1) or planar_trilinear_interpolate(*args))
    g = torch.Generator().manual_seed(8)
    field = torch.randn(2, 3, 16, 8, 12, generator=g, requires_grad=True)
    grid_points = (maps.identity_grid((32, 32, 16)) + 0.05 * torch.randn(2, 3, 32, 32, 16, generator=g))
    ours = interpolate(field, grid_points)
    assert calls == [1] and ours.shape == (2, 3, 32, 32, 16)
    activate_backend(monkeypatch, planar_sampler=False)
    theirs = interpolate(field, grid_points)
    assert calls == [1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # rows of 16 x 8: within 2^-16 voxels
