# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The ICON training loss: symmetric similarity + lambda * (gradient) inverse consistency (paper Eq. 12-14)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from monai.losses import DiceLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_icon.losses._reduction import reduce
from monai_icon.losses.gradient_inverse_consistency import GradientInverseConsistencyLoss
from monai_icon.losses.inverse_consistency import InverseConsistencyLoss
from monai_icon.losses.similarity import get_similarity, per_pair
from monai_icon.metrics.folds import count_folds
from monai_icon.networks.blocks import check_image_pair
from monai_icon.networks.maps import Map, interpolate, one_hot_labels
from monai_icon.precision import at_least_float32, autocast_disabled

__all__ = ["REGULARIZERS", "ICONLossOutput", "ICONLoss", "icon_loss"]

REGULARIZERS = ("icon", "gradicon")


class ICONLossOutput(NamedTuple):
    """Everything one ICON loss evaluation produces.

    Attributes:
        loss: ``similarity + lmbda * inverse_consistency`` (reduced; the value to back-propagate).
        similarity: symmetric similarity ``sim(A o phi_AB, B) + sim(B o phi_BA, A)`` (reduced).
        inverse_consistency: the regulariser value (ICON or GradICON; reduced).
        folds: folds of ``phi_AB`` per image, ``[B]`` (count of negative-Jacobian cells; no gradient; NaN when the
            loss was built with ``compute_folds=False``).
        warped_A: ``A o phi_AB`` on B's grid, ``[B, C, *N]``.
        warped_B: ``B o phi_BA`` on A's grid, ``[B, C, *N]``.
        phi_AB_grid: ``phi_AB`` on the image grid in ``[0, 1]`` units, ``[B, D, *N]``.
        label_dice_loss: the label term (Dice loss of the warped one-hot labels, both directions; reduced), zero
            without labels or with ``label_weight = 0``.
    """

    loss: torch.Tensor
    similarity: torch.Tensor
    inverse_consistency: torch.Tensor
    folds: torch.Tensor
    warped_A: torch.Tensor
    warped_B: torch.Tensor
    phi_AB_grid: torch.Tensor
    label_dice_loss: torch.Tensor | None = None


def _make_regularizer(
    regularizer: str | Callable, sigma: float, epsilon: float, point_fraction: float = 1.0
) -> Callable:
    if callable(regularizer):
        return regularizer
    key = str(regularizer).lower()
    if key in ("icon", "inverse_consistency"):
        return InverseConsistencyLoss(sigma=sigma, epsilon=epsilon, reduction="none", point_fraction=point_fraction)
    if key in ("gradicon", "gradient_inverse_consistency"):
        if epsilon:
            raise ValueError("epsilon (approximate inverse consistency noise) applies to 'icon' only, not 'gradicon'.")
        return GradientInverseConsistencyLoss(sigma=sigma, reduction="none", point_fraction=point_fraction)
    raise ValueError(f"unknown regularizer {regularizer!r}; choose one of {REGULARIZERS} or pass a callable.")


def _check_companions(image: torch.Tensor, first: tuple[str, torch.Tensor | None],
                      second: tuple[str, torch.Tensor | None], what: str) -> None:
    """Both or neither of two per-image tensors (masks, label maps), each ``[B, 1, *N]`` on ``image``'s grid."""
    if (first[1] is None) != (second[1] is None):
        raise ValueError(f"give both {what} ({first[0]} and {second[0]}) or neither.")
    for name, tensor in (first, second):
        if tensor is not None and (tensor.shape[0] != image.shape[0] or tensor.shape[1] != 1
                                   or tensor.shape[2:] != image.shape[2:]):
            raise ValueError(f"{name} must be [B, 1, *N] on the images' grid {tuple(image.shape[2:])}, "
                             f"got {tuple(tensor.shape)}.")


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
        label_weight: weight of an optional label-supervised ("weakly supervised") term: when ``forward`` gets
            label maps, MONAI's ``DiceLoss`` between the linearly warped one-hot moving labels and the fixed labels,
            both directions (``A``'s labels by ``phi_AB`` against ``B``'s, and vice versa). 0 (default): off.
        num_classes: label classes including background (required with ``label_weight > 0``).
        point_fraction: evaluate the regulariser (``"icon"`` or ``"gradicon"``) at a random fraction of the jittered
            grid points, drawn afresh each step (an unbiased estimate at that fraction of the cost; 1 = all, the
            paper).
        regularizer_size: the grid whose jittered points the regulariser is evaluated at (default ``None``: the
            images' grid). When the maps are displacement fields on a coarser grid than the images (e.g. instance
            optimisation comparing finer images than the fields it optimises), their own grid costs less and
            loses nothing; the regulariser is a mean over points, so its scale does not depend on this grid. Do
            not go coarser than the maps' grid: measured in 3D instance optimisation with GradICON, fields on a
            64x64x32 grid regularised at 32x32x16 points folded 24 % of their cells.
        compute_folds: count the folds of ``phi_AB`` on the images' grid for the output's ``folds`` (default). ``False``
            skips that count (``folds`` is then NaN per pair) where nobody reads it and the grid is large, e.g. in
            every step of instance optimisation on full-resolution images.
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
        label_weight: float = 0.0,
        num_classes: int | None = None,
        regularizer_size: Sequence[int] | None = None,
        compute_folds: bool = True,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if regularizer_size is not None:
            sizes = tuple(regularizer_size)
            if len(sizes) != spatial_dims or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2
                                                     for v in sizes):
                raise ValueError(f"regularizer_size must be {spatial_dims} integers >= 2, got {regularizer_size!r}.")
            regularizer_size = sizes
        self.regularizer_size = regularizer_size
        self.compute_folds = bool(compute_folds)
        if lmbda < 0:
            raise ValueError(f"lmbda must be >= 0, got {lmbda}.")
        self.spatial_dims = spatial_dims
        self.lmbda = float(lmbda)
        self.similarity = get_similarity(similarity, spatial_dims) if isinstance(similarity, str) else similarity
        self.regularizer = _make_regularizer(regularizer, sigma, epsilon, point_fraction)
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight}.")
        if label_weight > 0 and (num_classes is None or num_classes < 2):
            raise ValueError(f"label_weight > 0 needs num_classes >= 2 (with background), got {num_classes}.")
        self.label_weight = float(label_weight)
        self.num_classes = num_classes
        self.dice = DiceLoss(include_background=False, reduction="none")

    def forward(  # type: ignore[override]
        self, image_A: torch.Tensor, image_B: torch.Tensor, phi_AB: Map, phi_BA: Map,
        label_A: torch.Tensor | None = None, label_B: torch.Tensor | None = None,
        mask_A: torch.Tensor | None = None, mask_B: torch.Tensor | None = None,
    ) -> ICONLossOutput:
        """Args: the images ``[B, C, *N]`` (``A`` moving, ``B`` fixed) and both maps; optional label maps
        ``[B, 1, *N]`` for the label term; optional masks ``[B, 1, *N]`` (1 inside, 0 outside, or soft weights):
        the similarity of ``A o phi_AB`` against ``B`` is averaged over ``mask_B`` and that of ``B o phi_BA``
        against ``A`` over ``mask_A`` (loss masking; the images themselves are not changed)."""
        check_image_pair(image_A, image_B)
        _check_companions(image_A, ("mask_A", mask_A), ("mask_B", mask_B), "masks")
        _check_companions(image_A, ("label_A", label_A), ("label_B", label_B), "label maps")
        if image_A.ndim - 2 != self.spatial_dims:
            raise ValueError(
                f"this ICONLoss is for {self.spatial_dims}D images, got a {image_A.ndim - 2}D pair of shape "
                f"{tuple(image_A.shape)}."
            )
        with autocast_disabled(image_A.device):
            masks = None if mask_A is None or mask_B is None else (mask_A.float(), mask_B.float())
            return self._evaluate(at_least_float32(image_A), at_least_float32(image_B), phi_AB, phi_BA, label_A,
                                  label_B, masks)

    @staticmethod
    def _masked(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Per-pair mean of per-voxel similarity values ``[2B, K, *N]`` weighted by masks ``[2B, 1, *N]``."""
        if values.ndim != weights.ndim or values.shape[2:] != weights.shape[2:]:
            raise ValueError("loss masking needs a similarity with per-voxel values (mse, lncc, mind); this one "
                             f"returns shape {tuple(values.shape)}.")
        weights = weights.expand_as(values)
        total = weights.flatten(1).sum(dim=1)
        if bool((total <= 0).any()):
            raise ValueError("a mask is empty: the similarity has no voxel to be computed on.")
        return (values * weights).flatten(1).sum(dim=1) / total

    def _label_term(self, label_A: torch.Tensor, label_B: torch.Tensor, grid_AB: torch.Tensor,
                    phi_BA: Map) -> torch.Tensor:
        """Per-pair Dice loss of the warped one-hot labels, both directions: ``[B]``."""
        num_classes = int(self.num_classes)  # type: ignore[arg-type]  # checked in __init__
        onehot_A, onehot_B = one_hot_labels(label_A, num_classes), one_hot_labels(label_B, num_classes)
        warped_A = interpolate(onehot_A, grid_AB)  # linear: differentiable with respect to the map
        warped_B = interpolate(onehot_B, phi_BA.grid(label_B.shape[2:]))
        both = self.dice(torch.cat([warped_A, warped_B]), torch.cat([onehot_B, onehot_A]))
        return per_pair(both, 2 * label_A.shape[0]).reshape(2, -1).sum(dim=0)

    def _evaluate(self, image_A: torch.Tensor, image_B: torch.Tensor, phi_AB: Map, phi_BA: Map,
                  label_A: torch.Tensor | None = None, label_B: torch.Tensor | None = None,
                  masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> ICONLossOutput:
        batch, shape = image_A.shape[0], image_A.shape[2:]
        grid_AB, grid_BA = phi_AB.grid(shape), phi_BA.grid(shape)
        warped_A, warped_B = interpolate(image_A, grid_AB), interpolate(image_B, grid_BA)
        del grid_BA  # full-size and not needed below: free it before the regulariser's evaluations
        # before the regulariser, whose saved tensors would add to its peak
        folds = (count_folds(grid_AB.detach()) if self.compute_folds
                 else torch.full((batch,), float("nan"), device=grid_AB.device))
        # both directions in one call (similarities are per pair): sim(A o phi_AB, B) + sim(B o phi_BA, A)
        both = self.similarity(torch.cat([warped_A, warped_B]), torch.cat([image_B, image_A]))
        if masks is None:
            similarity = per_pair(both, 2 * batch).reshape(2, batch).sum(dim=0)
        else:
            similarity = self._masked(both, torch.cat([masks[1], masks[0]])).reshape(2, batch).sum(dim=0)
        regularizer_shape = self.regularizer_size or tuple(shape)
        regularization = per_pair(torch.as_tensor(self.regularizer(phi_AB, phi_BA, regularizer_shape)), batch)
        total = similarity + self.lmbda * regularization
        label_term = torch.zeros_like(total)
        if self.label_weight > 0 and label_A is not None and label_B is not None:
            label_term = self._label_term(label_A, label_B, grid_AB, phi_BA)
            total = total + self.label_weight * label_term
        return ICONLossOutput(
            loss=reduce(total, self.reduction),
            similarity=reduce(similarity, self.reduction),
            inverse_consistency=reduce(regularization, self.reduction),
            folds=folds,
            warped_A=warped_A,
            warped_B=warped_B,
            phi_AB_grid=grid_AB,
            label_dice_loss=reduce(label_term, self.reduction),
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
