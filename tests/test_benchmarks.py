"""The benchmark scripts compare like with like (timings themselves are never asserted)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import grid_sample_bench  # noqa: E402


@pytest.mark.parametrize("name", ["gather", "slices-2d-float64", "slices-2d-float32"])
def test_grid_sample_alternatives_sample_like_interpolate(name):
    torch.manual_seed(0)
    field = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64)
    points = torch.rand(2, 3, 300, dtype=torch.float64) * 1.2 - 0.1  # some beyond the border
    grad_out = torch.randn(2, 3, 300, dtype=torch.float64)
    expected = grid_sample_bench.forward_backward(grid_sample_bench.METHODS["interpolate"], field, points, grad_out)
    got = grid_sample_bench.forward_backward(grid_sample_bench.METHODS[name], field, points, grad_out)
    tol = 1e-4 if name.endswith("float32") else 1e-10  # float32 coordinates on the stacked slices
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)
