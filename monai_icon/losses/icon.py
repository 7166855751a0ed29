# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The ICON training loss: symmetric similarity + lambda * (gradient) inverse consistency (paper Eq. 12-14)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_icon.losses._reduction import reduce
from monai_icon.losses.gradient_inverse_consistency import GradientInverseConsistencyLoss
from monai_icon.losses.inverse_consistency import InverseConsistencyLoss
from monai_icon.losses.similarity import get_similarity, per_pair
from monai_icon.metrics.folds import count_folds
from monai_icon.networks.blocks import check_image_pair
from monai_icon.networks.maps import Map, interpolate
from monai_icon.precision import at_least_float32, autocast_disabled

__all__ = ["REGULARIZERS", "ICONLossOutput", "ICONLoss", "icon_loss"]

REGULARIZERS = ("icon", "gradicon")


class ICONLossOutput(NamedTuple):
    """Everything one ICON loss evaluation produces.

    Attributes:
        loss: ``similarity + lmbda * inverse_consistency`` (reduced; the value to back-propagate).
        similarity: symmetric similarity ``sim(A o phi_AB, B) + sim(B o phi_BA, A)`` (reduced).
        inverse_consistency: the regulariser value (ICON or GradICON; reduced).
        folds: folds of ``phi_AB`` per image, ``[B]`` (count of negative-Jacobian cells; no gradient).
        warped_A: ``A o phi_AB`` on B's grid, ``[B, C, *N]``.
        warped_B: ``B o phi_BA`` on A's grid, ``[B, C, *N]``.
        phi_AB_grid: ``phi_AB`` on the image grid in ``[0, 1]`` units, ``[B, D, *N]``.
    """

    loss: torch.Tensor
    similarity: torch.Tensor
    inverse_consistency: torch.Tensor
    folds: torch.Tensor
    warped_A: torch.Tensor
    warped_B: torch.Tensor
    phi_AB_grid: torch.Tensor


def _make_regularizer(
    regularizer: str | Callable, sigma: float, epsilon: float, point_fraction: float = 1.0
) -> Callable:
    if callable(regularizer):
        return regularizer
    key = str(regularizer).lower()
    if key in ("icon", "inverse_consistency"):
        return InverseConsistencyLoss(sigma=sigma, epsilon=epsilon, reduction="none", point_fraction=point_fraction)
    if point_fraction != 1.0:
        raise ValueError("point_fraction applies to 'icon' only.")
    if key in ("gradicon", "gradient_inverse_consistency"):
        if epsilon:
            raise ValueError("epsilon (approximate inverse consistency noise) applies to 'icon' only, not 'gradicon'.")
        return GradientInverseConsistencyLoss(sigma=sigma, reduction="none")
    raise ValueError(f"unknown regularizer {regularizer!r}; choose one of {REGULARIZERS} or pass a callable.")


class ICONLoss(_Loss):
    """Symmetric similarity plus ``lmbda`` times an inverse consistency regulariser.

    Normalisation follows the paper (docs/conventions.md section 3), so ``lmbda = 2048`` here is ``lambda = 2048`` in
    Table 1: the MSE similarity is ``mean((A o phi_AB - B)^2) + mean((B o phi_BA - A)^2)`` and the inverse
    consistency ``mean(e_AB^2) + mean(e_BA^2)`` in ``[0, 1]`` units at random off-grid points.

    Args:
        similarity: ``"mse"``, ``"lncc"``, ``"mi"`` (see :func:`~monai_icon.losses.similarity.get_similarity`) or a
            loss module ``sim(pred, target)`` whose value for a pair does not depend on the other pairs of the batch
            (both directions are evaluated in one call), preferably built with ``reduction="none"`` (a reducing
            module works but then ``reduction="none"`` gives no per-pair similarity).
        lmbda: weight of the regulariser (a plain attribute: schedules such as the adaptive lambda may change it).
        regularizer: ``"icon"`` (:class:`InverseConsistencyLoss`), ``"gradicon"``
            (:class:`GradientInverseConsistencyLoss`) or a callable ``reg(phi_AB, phi_BA, shape)`` returning ``[B]``
            or a scalar.
        spatial_dims: 2 or 3; inputs of another dimension are rejected.
        sigma: off-grid jitter of the regulariser's sample points, in voxels per axis.
        epsilon: approximate inverse consistency noise in voxels per axis (``"icon"`` only; 0 = off).
        point_fraction: ``"icon"`` only: evaluate the inverse consistency at a random fraction of the jittered grid
            points (an unbiased estimate at that fraction of the cost; 1 = all, the paper).
        reduction: ``"mean"`` | ``"sum"`` over pairs, or ``"none"`` for ``[B]`` values.

    ``forward(image_A, image_B, phi_AB, phi_BA)`` takes ``[B, C, *N]`` images and the two maps (``A`` moving,
    ``B`` fixed) and returns an :class:`ICONLossOutput`.

    The loss is computed in float32 (float16 / bfloat16 images are converted) with ``torch.autocast`` turned off
    inside it, so that mixed-precision training (``amp=True``) speeds up the networks without lowering the
    precision of the warps, the similarity (LNCC's local variances, MI's joint histogram) or the regulariser.
    """

    def __init__(
        self,
        similarity: str | _Loss = "mse",
        lmbda: float = 2048.0,
        regularizer: str | Callable = "icon",
        spatial_dims: int = 2,
        sigma: float = 1.0,
        epsilon: float = 0.0,
        reduction: LossReduction | str = LossReduction.MEAN,
        point_fraction: float = 1.0,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if lmbda < 0:
            raise ValueError(f"lmbda must be >= 0, got {lmbda}.")
        self.spatial_dims = spatial_dims
        self.lmbda = float(lmbda)
        self.similarity = get_similarity(similarity, spatial_dims) if isinstance(similarity, str) else similarity
        self.regularizer = _make_regularizer(regularizer, sigma, epsilon, point_fraction)

    def forward(  # type: ignore[override]
        self, image_A: torch.Tensor, image_B: torch.Tensor, phi_AB: Map, phi_BA: Map
    ) -> ICONLossOutput:
        check_image_pair(image_A, image_B)
        if image_A.ndim - 2 != self.spatial_dims:
            raise ValueError(
                f"this ICONLoss is for {self.spatial_dims}D images, got a {image_A.ndim - 2}D pair of shape "
                f"{tuple(image_A.shape)}."
            )
        with autocast_disabled(image_A.device):
            return self._evaluate(at_least_float32(image_A), at_least_float32(image_B), phi_AB, phi_BA)

    def _evaluate(self, image_A: torch.Tensor, image_B: torch.Tensor, phi_AB: Map, phi_BA: Map) -> ICONLossOutput:
        batch, shape = image_A.shape[0], image_A.shape[2:]
        grid_AB, grid_BA = phi_AB.grid(shape), phi_BA.grid(shape)
        warped_A, warped_B = interpolate(image_A, grid_AB), interpolate(image_B, grid_BA)
        del grid_BA  # full-size and not needed below: free it before the regulariser's evaluations
        folds = count_folds(grid_AB.detach())  # before the regulariser, whose saved tensors would add to its peak
        # both directions in one call (similarities are per pair): sim(A o phi_AB, B) + sim(B o phi_BA, A)
        both = self.similarity(torch.cat([warped_A, warped_B]), torch.cat([image_B, image_A]))
        similarity = per_pair(both, 2 * batch).reshape(2, batch).sum(dim=0)
        regularization = per_pair(torch.as_tensor(self.regularizer(phi_AB, phi_BA, shape)), batch)
        total = similarity + self.lmbda * regularization
        return ICONLossOutput(
            loss=reduce(total, self.reduction),
            similarity=reduce(similarity, self.reduction),
            inverse_consistency=reduce(regularization, self.reduction),
            folds=folds,
            warped_A=warped_A,
            warped_B=warped_B,
            phi_AB_grid=grid_AB,
        )


def icon_loss(
    image_A: torch.Tensor,
    image_B: torch.Tensor,
    phi_AB: Map,
    phi_BA: Map,
    lmbda: float,
    similarity: str | _Loss = "mse",
    regularizer: str | Callable = "icon",
    sigma: float = 1.0,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """Functional form of :class:`ICONLoss`: the mean total loss over the batch as a scalar tensor."""
    loss = ICONLoss(similarity, lmbda, regularizer, image_A.ndim - 2, sigma, epsilon)
    return loss(image_A, image_B, phi_AB, phi_BA).loss
