# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Image similarity losses by name (MSE, MONAI's LNCC and mutual information) and per-pair reduction."""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.utils import LossReduction
from torch.autograd.function import once_differentiable
from torch.nn.modules.loss import _Loss

from monai_icon import backend
from monai_icon.backend.lncc_kernels import lncc_backward, lncc_forward
from monai_icon.losses.mind import MINDSSCLoss

__all__ = ["SIMILARITIES", "DEFAULT_LNCC_KERNEL", "StackedLNCCLoss", "get_similarity", "per_pair", "shifted_filtering"]

#: the LNCC window (voxels per axis) of :func:`get_similarity` when none is given
DEFAULT_LNCC_KERNEL = 7


def shifted_filtering(x: torch.Tensor, taps: tuple[float, ...], spatial_dims: int) -> torch.Tensor:
    """``monai.networks.layers.separable_filtering(x, [kernel] * spatial_dims)`` (zero padding) for an odd-length
    kernel with values ``taps``, as weighted sums of shifted views of the input.

    Same values as the convolution up to the order of the floating-point additions, on every device: only
    elementwise operations are used, which keep float32 where cuDNN runs float32 convolutions in TF32 by default
    (``torch.backends.cudnn.allow_tf32``: inputs rounded to 10 mantissa bits, which the LNCC's differences of local
    sums of squares magnify). On CPU it is also several times faster than MONAI's depthwise convolution for the
    few-channel, many-voxel tensors of the LNCC (``docs/benchmarks.md``), because each shift is one vectorised pass
    over contiguous memory, and no padded copy is made (a shift adds into the part of the output it overlaps). A box
    kernel (all taps equal, the LNCC's rectangular window) is summed along each axis longer than the kernel as ``r``
    sums of neighbouring pairs plus one value (``r + 1`` passes instead of ``2 r + 1``), and scaled once at the end.

    Args:
        x: ``[B, C, *N]`` with ``spatial_dims`` spatial axes.
        taps: the 1D kernel, odd length ``2 r + 1``, centred on each voxel along every spatial axis.
    """
    if len(taps) % 2 != 1:
        raise ValueError(f"shifted_filtering needs an odd number of taps, got {len(taps)}.")
    if x.ndim != spatial_dims + 2:
        raise ValueError(f"expected x of shape [B, C] + {spatial_dims} spatial axes, got shape {tuple(x.shape)}.")
    radius = len(taps) // 2
    # a box (e.g. LNCC's rectangular kernel): pairwise sums, then one scaling. The box path writes through a strided
    # out=, which autograd and torch.compile do not support: the generic shifts there (compile fuses them anyway)
    recording = x.requires_grad and torch.is_grad_enabled()
    box = radius > 0 and all(t == taps[0] for t in taps) and not recording and not torch.compiler.is_compiling()
    box_axes = 0
    for axis in range(2, 2 + spatial_dims):
        size = x.shape[axis]
        if box and size > 2 * radius:
            x = _box_sum(x, axis, radius)
            box_axes += 1
            continue
        out = x * taps[radius]
        for offset in range(1, min(radius, size - 1) + 1):  # out[i] += taps[r + o] x[i + o] + taps[r - o] x[i - o]
            out.narrow(axis, 0, size - offset).add_(x.narrow(axis, offset, size - offset), alpha=taps[radius + offset])
            out.narrow(axis, offset, size - offset).add_(x.narrow(axis, 0, size - offset), alpha=taps[radius - offset])
        x = out
    if box_axes and taps[0] != 1.0:
        x = x * taps[0] ** box_axes
    return x


def _box_sum(x: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """``out[i] = sum(x[i - radius : i + radius + 1])`` along ``axis`` (zeros outside), for ``x.shape[axis] >
    2 radius``, in ``radius + 1`` passes over the tensor instead of ``2 radius + 1``.

    With the sums of neighbouring pairs ``q[k] = x[k] + x[k + 1]`` (``x`` zero outside), each window is ``radius``
    pairs and one single value: ``out[i] = sum_m q[i - radius + 2 m] + x[i + radius]`` for ``m < radius``. The
    pairs are written once into a buffer padded so that every pair term covers the whole output.
    """
    size = x.shape[axis]
    padded = list(x.shape)
    padded[axis] = size + 2 * radius - 2  # q[k] for k in [-radius, size + radius - 3], at slot k + radius
    pairs = x.new_empty(padded)
    torch.add(x.narrow(axis, 0, size - 1), x.narrow(axis, 1, size - 1), out=pairs.narrow(axis, radius, size - 1))
    pairs.narrow(axis, radius - 1, 1).copy_(x.narrow(axis, 0, 1))  # q[-1] = x[0]
    if radius > 1:
        pairs.narrow(axis, 0, radius - 1).zero_()  # q[k] = 0 for k < -1
        pairs.narrow(axis, size + radius - 1, 1).copy_(x.narrow(axis, size - 1, 1))  # q[size - 1] = x[size - 1]
        pairs.narrow(axis, size + radius, radius - 2).zero_()  # q[k] = 0 for k > size - 1
        out = torch.add(pairs.narrow(axis, 0, size), pairs.narrow(axis, 2, size))
        for m in range(2, radius):
            out.add_(pairs.narrow(axis, 2 * m, size))
    else:
        out = pairs  # radius 1: the single pair term is the whole buffer
    out.narrow(axis, 0, size - radius).add_(x.narrow(axis, radius, size - radius))
    return out


def _shifted_filtering(x: torch.Tensor, taps: tuple[float, ...]) -> torch.Tensor:
    return shifted_filtering(x, taps, x.ndim - 2)


class _LocalNCC(torch.autograd.Function):
    """Per-voxel local NCC ``(cross^2 + nr) / (t_var p_var)`` with a hand-written backward
    (:func:`~monai_icon.backend.lncc_kernels.lncc_forward` and
    :func:`~monai_icon.backend.lncc_kernels.lncc_backward` with :func:`shifted_filtering`).

    Autograd through the formula keeps about twenty full-size intermediates alive until the backward pass; this
    function keeps the five filtered sums only and computes the gradient in closed form: with ``S = K * s`` the
    sums of ``s = [t, p, t^2, p^2, t p]`` under MONAI's (symmetric, zero-padded, hence self-adjoint) filter ``K``,
    ``d ncc / d s = K * (d ncc / d S)``, then ``d/dp = g_p + 2 p g_{p^2} + t g_{tp}`` (and likewise for ``t``).
    The CPU backend's hook (:func:`monai_icon.backend.lncc`) may compute both passes instead (the same formulas,
    compiled).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, pred, target, kernel_vol, taps, smooth_nr: float, smooth_dr: float
    ):
        ctx.taps, ctx.smooth_nr, ctx.smooth_dr = taps, smooth_nr, smooth_dr
        out = backend.lncc(pred, target, kernel_vol, taps, smooth_nr, smooth_dr)  # None: not run
        if out is None:
            ncc, sums = lncc_forward(pred, target, kernel_vol, taps, smooth_nr, smooth_dr, filtering=_shifted_filtering)
            ctx.backend_backward = None
        else:
            ncc, sums, ctx.backend_backward = out
        ctx.save_for_backward(pred, target, sums, kernel_vol)
        return ncc

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ncc):  # type: ignore[override]
        pred, target, sums, kernel_vol = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_pred or need_target):
            return None, None, None, None, None, None
        args = (grad_ncc, pred, target, sums, kernel_vol, ctx.taps, ctx.smooth_nr, ctx.smooth_dr, need_pred,
                need_target)
        grads = ctx.backend_backward(*args) if ctx.backend_backward is not None else None  # None: not run
        if grads is None:
            grads = lncc_backward(*args, filtering=_shifted_filtering)
        return grads[0], grads[1], None, None, None, None


class StackedLNCCLoss(LocalNormalizedCrossCorrelationLoss):
    """``monai.losses.LocalNormalizedCrossCorrelationLoss``, faster and with less memory.

    MONAI's loss filters ``t``, ``p``, ``t^2``, ``p^2`` and ``t p`` one after another and back-propagates through
    every intermediate; here they are stacked along the channel axis and filtered together, and the gradient is
    computed in closed form from the five filtered sums (one 3-channel filtering in the backward pass). The
    filtering is :func:`shifted_filtering` (shifted sums instead of MONAI's depthwise convolution: faster on CPU,
    and never in TF32 on GPUs). Same arguments, values and gradients as the MONAI loss up to floating-point
    rounding (best value -1); no double backward.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not torch.equal(self.kernel, self.kernel.flip(0)):  # the closed-form backward needs K^T = K
            raise ValueError("StackedLNCCLoss needs a symmetric filter kernel.")
        self.taps = tuple(float(w) for w in self.kernel)  # the fixed filter as Python numbers

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim - 2 != self.ndim:
            raise ValueError(f"expecting pred with {self.ndim} spatial dimensions, got pred of shape {pred.shape}")
        if target.shape != pred.shape:
            raise ValueError(f"ground truth has differing shape ({target.shape}) from pred ({pred.shape})")
        kernel_vol = self.kernel_vol.to(pred)
        ncc = _LocalNCC.apply(pred, target, kernel_vol, self.taps, self.smooth_nr, self.smooth_dr)
        if self.reduction == LossReduction.SUM.value:
            return torch.sum(ncc).neg()
        if self.reduction == LossReduction.NONE.value:
            return ncc.neg()
        if self.reduction == LossReduction.MEAN.value:
            return torch.mean(ncc).neg()
        raise ValueError(f'Unsupported reduction: {self.reduction}, available options are ["mean", "sum", "none"].')


SIMILARITIES = ("mse", "lncc", "mi", "mind")


def get_similarity(name: str, spatial_dims: int = 2, **kwargs: Any) -> _Loss:
    """Build an image similarity loss with ``reduction="none"`` (per-voxel or per-pair values).

    Args:
        name: ``"mse"`` (``torch.nn.MSELoss``, the paper's choice), ``"lncc"`` (MONAI's local normalised
            cross-correlation, computed by :class:`StackedLNCCLoss`; best value -1; default here
            ``kernel_size=DEFAULT_LNCC_KERNEL``, 7)
            ``"mi"`` (``monai.losses.GlobalMutualInformationLoss``, negative MI) or ``"mind"``
            (:class:`~monai_icon.losses.mind.MINDSSCLoss`, MIND-SSC descriptors, multimodal; best value 0).
        spatial_dims: 2 or 3 (used by LNCC).
        kwargs: passed to the loss constructor.

    Raises:
        ValueError: unknown name.
    """
    key = str(name).lower()
    if key == "mse":
        return torch.nn.MSELoss(reduction="none", **kwargs)
    if key == "lncc":
        kwargs.setdefault("kernel_size", DEFAULT_LNCC_KERNEL)
        return StackedLNCCLoss(spatial_dims=spatial_dims, reduction="none", **kwargs)
    if key == "mi":
        return GlobalMutualInformationLoss(reduction="none", **kwargs)
    if key == "mind":
        return MINDSSCLoss(spatial_dims=spatial_dims, reduction="none", **kwargs)
    raise ValueError(f"unknown similarity {name!r}; choose one of {SIMILARITIES} or pass a loss module.")


def per_pair(value: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Reduce a loss value computed with ``reduction="none"`` to one value per pair: ``[B]``.

    A value whose first axis is the batch is averaged over its other axes. A scalar (a loss built with a
    reducing ``reduction``) is broadcast to ``[B]``; it then carries no per-pair information.
    """
    if value.ndim == 0:
        return value.expand(batch_size)
    if value.shape[0] != batch_size:
        raise ValueError(f"expected a loss value with batch size {batch_size} first, got shape {tuple(value.shape)}.")
    return value.reshape(batch_size, -1).mean(dim=1)
