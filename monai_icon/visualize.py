# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Figures like the paper's Fig. 1: moving, fixed, warped moving and the deformed grid coloured by the
Jacobian determinant."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from monai_icon.metrics.folds import jacobian_determinant

__all__ = ["registration_figure", "save_figure", "save_registration_figure"]


def _mid_slice(t: torch.Tensor) -> np.ndarray:
    """``[C, *N]`` -> ``[C, H, W]`` numpy (3D: the middle slice of the last axis)."""
    t = t.detach().float().cpu()
    if t.ndim == 4:
        t = t[..., t.shape[-1] // 2]
    return t.numpy()


def registration_figure(
    moving: torch.Tensor,
    fixed: torch.Tensor,
    warped: torch.Tensor,
    phi_grid: torch.Tensor,
    max_rows: int = 4,
    grid_lines: int = 16,
):
    """Build a matplotlib figure, one row per pair: moving, fixed, warped moving, deformed grid.

    Args:
        moving, fixed, warped: ``[B, 1, *N]`` images (2D, or 3D shown by their middle slice of the last axis).
        phi_grid: ``[B, D, *N]`` map ``phi_AB`` on the fixed grid in ``[0, 1]`` units.
        max_rows: at most this many pairs are drawn.
        grid_lines: number of contour lines per coordinate of the deformed grid.

    The fourth panel draws the level lines of ``phi_AB``'s first two coordinates over the fixed image's space
    (the moving image's grid lines, deformed), on top of the Jacobian determinant of ``phi_AB`` (relative to
    the identity: 1 = volume preserved; red below 0 = folds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(max_rows, moving.shape[0])
    fig, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
    for r in range(rows):
        grid = phi_grid[r : r + 1].detach().float().cpu()
        det = jacobian_determinant(grid)[0]
        shape = grid.shape[2:]
        cell = float(np.prod([1.0 / max(n - 1, 1) for n in shape]))
        det = det / cell
        phi = _mid_slice(grid[0])
        det_np = _mid_slice(det[None])[0]
        for c, (title, img) in enumerate(
            (("moving", moving[r]), ("fixed", fixed[r]), ("warped moving", warped[r]))
        ):
            axes[r, c].imshow(_mid_slice(img)[0], cmap="gray")
            axes[r, c].set_title(title)
        ax = axes[r, 3]
        im = ax.imshow(
            det_np, cmap="RdBu", vmin=-2, vmax=4, extent=(-0.5, phi.shape[2] - 1.5, phi.shape[1] - 1.5, -0.5)
        )
        levels = np.linspace(0, 1, grid_lines)
        ax.contour(phi[0], levels=levels, colors="k", linewidths=0.6)
        ax.contour(phi[1], levels=levels, colors="k", linewidths=0.6)
        ax.set_title(f"grid, det J (folds: {int((det < 0).sum())})")
        fig.colorbar(im, ax=ax, fraction=0.046)
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure to ``path`` atomically (temporary file in the same folder, then rename) and
    close it; the folder is created if needed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_registration_figure(path: str | Path, *args, **kwargs) -> Path:
    """Draw :func:`registration_figure` and write it to ``path`` (PNG) atomically."""
    return save_figure(registration_figure(*args, **kwargs), path)
