# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Folds: grid cells where a map's Jacobian determinant is negative (paper Sec. 4.4, docs/conventions.md section 4).

The determinant of each cell is taken from one-sided differences of the map along the cell's edges, with the
reference implementation's stencils: in 2D forward differences at the cell's first corner,
``du = phi[1:, :-1] - phi[:-1, :-1]``, ``dv = phi[:-1, 1:] - phi[:-1, :-1]``, ``dA = du_0 dv_1 - du_1 dv_0``; in
3D backward differences at the cell's opposite (far) corner, ``a = phi[1:, 1:, 1:] - phi[:-1, 1:, 1:]``,
``b = phi[1:, 1:, 1:] - phi[1:, :-1, 1:]``, ``c = phi[1:, 1:, 1:] - phi[1:, 1:, :-1]``, ``dV = (a x b) . c``.
The count is per image (the ICON paper's number); the percentage divides by the number of cells. Counts from
central differences or from physical-space Jacobian filters are not comparable with these.
"""

from __future__ import annotations

import torch
from monai.utils import MetricReduction

from monai_icon.metrics._reduction import PerPairMetric

from monai_icon.networks.maps import ddf_to_map_grid

__all__ = ["jacobian_determinant", "count_folds", "FoldsMetric"]


def jacobian_determinant(grid: torch.Tensor) -> torch.Tensor:
    """Per-cell Jacobian determinant (up to a positive factor) of a map sampled on a grid.

    Args:
        grid: ``[B, D, *N]`` map values (any consistent unit: ``[0, 1]`` coordinates or voxels) at the points
            of the identity grid, ``D`` = 2 or 3 = ``len(N)``.

    Returns:
        ``[B, *(N - 1)]`` determinants (2D: forward differences at each cell's first corner; 3D: backward
        differences at its far corner, the reference's stencils); positive for orientation-preserving cells.
    """
    dims = grid.ndim - 2
    if dims not in (2, 3) or grid.shape[1] != dims:
        raise ValueError(f"grid must be [B, 2, H, W] or [B, 3, H, W, D], got shape {tuple(grid.shape)}.")
    # 2D: differences from each cell's first (near) corner; 3D: from its opposite (far) corner, as the
    # reference implementation counts them (docs/conventions.md), so fold counts are comparable with the papers'
    anchor = 0 if dims == 2 else 1
    corner = grid[(slice(None), slice(None), *([slice(anchor, grid.shape[2 + d] - 1 + anchor) for d in range(dims)]))]

    def diff(axis: int) -> torch.Tensor:
        index = [slice(anchor, grid.shape[2 + d] - 1 + anchor) for d in range(dims)]
        index[axis] = slice(1 - anchor, grid.shape[2 + axis] - anchor)  # the neighbour along `axis`
        neighbour = grid[(slice(None), slice(None), *index)]
        return neighbour - corner if anchor == 0 else corner - neighbour

    if dims == 2:
        du, dv = diff(0), diff(1)
        return du[:, 0] * dv[:, 1] - du[:, 1] * dv[:, 0]
    a, b, c = diff(0), diff(1), diff(2)
    # the triple product (a x b) . c written out: on CPU much faster than linalg.cross on these strided views, and
    # every training step counts folds
    return (c[:, 0] * (a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1]) + c[:, 1] * (a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2])
            + c[:, 2] * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]))


def count_folds(grid: torch.Tensor, percentage: bool = False) -> torch.Tensor:
    """Number of folded cells (negative Jacobian determinant) per image.

    Args:
        grid: ``[B, D, *N]`` map sampled on the identity grid (see :func:`jacobian_determinant`).
        percentage: return ``100 * folds / cells`` instead of the count.

    Returns:
        ``[B]`` float tensor (no gradient).
    """
    with torch.no_grad():
        det = jacobian_determinant(grid)
        folds = (det < 0).flatten(1).sum(dim=1).to(torch.float32)
        return folds * (100.0 / det[0].numel()) if percentage else folds


class FoldsMetric(PerPairMetric):
    """MONAI metric of folds per image, accumulated over iterations.

    Args:
        percentage: report ``100 * folds / cells`` instead of the count.
        input_type: ``"ddf"`` (default): ``y_pred`` is a MONAI voxel DDF ``[B, D, *N]``; ``"map"``: ``y_pred`` is
            the map sampled on the identity grid in ``[0, 1]`` units.
        reduction: MONAI metric reduction used by :meth:`aggregate` (default ``"mean"``).
        get_not_nans: also return the count of non-NaN values from :meth:`aggregate`.

    ``metric(y_pred=ddf)`` returns ``[B, 1]`` per-image values; ``aggregate()`` reduces all of them.
    """

    def __init__(
        self,
        percentage: bool = False,
        input_type: str = "ddf",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction, get_not_nans)
        if input_type not in ("ddf", "map"):
            raise ValueError(f"input_type must be 'ddf' or 'map', got {input_type!r}.")
        self.percentage = percentage
        self.input_type = input_type

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        grid = ddf_to_map_grid(y_pred) if self.input_type == "ddf" else y_pred
        return count_folds(grid.float(), self.percentage).unsqueeze(1)
