import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class FixedDisplacementNet(torch.nn.Module):
    """A stand-in network returning a displacement that depends on its inputs in a known, smooth way."""

    def __init__(self, scale: float = 0.05) -> None:
        super().__init__()
        self.scale = scale
        self.calls = []

    def forward(self, image_A, image_B=None):
        self.calls.append(tuple(image_A.shape))
        dims = image_A.ndim - 2
        d = torch.tanh(image_A - image_B)[:, :1]
        return self.scale * torch.cat([d * (k + 1) for k in range(dims)], dim=1)


@pytest.fixture
def fixed_net():
    return FixedDisplacementNet


def smooth_random_field(batch, shape, amplitude=0.05, generator=None):
    """A smooth random displacement [B, D, *shape] in [0, 1] units (low-frequency noise upsampled)."""
    dims = len(shape)
    coarse = torch.randn(batch, dims, *([4] * dims), generator=generator) * amplitude
    mode = "bilinear" if dims == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


def run_bundle(*args: str, check: bool = True, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in a subprocess (unbuffered output, captured as text); with ``check``, a
    failure raises an AssertionError carrying the tails of stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"monai.bundle {' '.join(args[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
