# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The LNCC's per-voxel value and its closed-form gradient as two plain functions, and their form compiled by
``torch.compile`` on the CPU behind :func:`lncc`, the hook that the LNCC similarity calls.

:class:`~monai_icon.losses.similarity.StackedLNCCLoss` computes :func:`lncc_forward` and :func:`lncc_backward`
eagerly: each is a chain of full-size elementwise operations and shifted sums (the local sums of ``t``, ``p``,
``t^2``, ``p^2`` and ``t p`` along every axis), each one pass over memory. Inductor turns the same chain into about
one loop per axis: the products are formed inside the first axis's sums, and the LNCC's formula inside the last
one, which makes forward and backward several times faster than eagerly on large 3D images
(``docs/benchmarks.md``).

Taken where :func:`use_compiled_lncc` allows it: when the active CPU backend has ``compiled_lncc``
(:func:`monai_icon.backend.use_backend`), for large float32 CPU images. The first call of each input signature in a
process waits for the compiler (once per shape, longest the first time on a machine; PyTorch's on-disk cache keeps
the kernels for later processes). :func:`lncc_forward` and :func:`lncc_backward` run on any device (the tests
compare them with MONAI's loss).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from monai_icon.backend.compilation import compiler_available, run_compiled
from monai_icon.backend.settings import active

__all__ = [
    "COMPILED_LNCC_MIN_VOXELS", "lncc", "use_compiled_lncc", "lncc_forward", "lncc_backward",
    "compiled_lncc_forward", "compiled_lncc_backward", "padded_filtering",
]

#: Images with fewer voxels than this (over the batch) stay eager: the compiled loops pay on large images, and small
#: calls (unit tests, 2D-sized work, the coarse scales of a multi-scale loss) then never wait for a compilation.
COMPILED_LNCC_MIN_VOXELS = 2**18
#: At most this many input signatures (shape, which inputs need gradients) of each function (forward, backward) are
#: compiled per process; further ones stay eager (Dynamo itself recompiles a function at most 8 times before
#: falling back to slower eager tracing).
_MAX_SIGNATURES = 4

#: the compile cache of this process: the compiled functions, the signatures compiled, an earlier failure
_state: dict[str, Any] = {"forward": None, "backward": None, "failed": None,
                          "signatures": {"forward": set(), "backward": set()}}


def use_compiled_lncc(pred: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether the LNCC of ``pred`` and ``target`` takes the compiled functions: with the active CPU backend's
    ``compiled_lncc``, float32 CPU tensors of the same shape with at least :data:`COMPILED_LNCC_MIN_VOXELS` voxels,
    outside ``torch.compile`` (a compiled caller fuses the loss itself), with a C++ compiler available and no earlier
    compilation failure in this process."""
    if not active().compiled_lncc or _state["failed"] is not None:
        return False
    if pred.device.type != "cpu" or target.device != pred.device or pred.shape != target.shape:
        return False
    if pred.dtype != torch.float32 or target.dtype != torch.float32 or pred.numel() < COMPILED_LNCC_MIN_VOXELS:
        return False
    if torch.compiler.is_compiling():
        return False
    return compiler_available()


Filtering = Callable[[torch.Tensor, tuple[float, ...]], torch.Tensor]


def padded_filtering(x: torch.Tensor, taps: tuple[float, ...]) -> torch.Tensor:
    """``x`` (``[B, C, *N]``) filtered along every spatial axis by the odd-length kernel ``taps``, zeros outside:
    weighted sums of shifted slices of a zero-padded copy (which Inductor reads in place, one loop per axis)."""
    radius = len(taps) // 2
    for axis in range(2, x.ndim):
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - axis)] = pad[2 * (x.ndim - 1 - axis) + 1] = radius
        padded = F.pad(x, pad)
        size = x.shape[axis]
        x = sum(padded.narrow(axis, k, size) * w for k, w in enumerate(taps))  # type: ignore[assignment]
    return x


def _terms(sums: torch.Tensor, channels: int, kernel_vol: torch.Tensor, smooth_dr: float):
    """``cross``, the floored variances and their raw values from the local sums ``[t, p, t^2, p^2, t p]``."""
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = sums.split(channels, dim=1)
    cross = tp_sum - p_sum * t_sum / kernel_vol
    t_var_raw = t2_sum - t_sum * t_sum / kernel_vol
    p_var_raw = p2_sum - p_sum * p_sum / kernel_vol
    return cross, t_var_raw.clamp(min=smooth_dr), p_var_raw.clamp(min=smooth_dr), t_var_raw, p_var_raw


def lncc_forward(
    pred: torch.Tensor, target: torch.Tensor, kernel_vol: torch.Tensor, taps: tuple[float, ...], smooth_nr: float,
    smooth_dr: float, filtering: Filtering = padded_filtering,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's per-voxel local NCC ``(cross^2 + smooth_nr) / (t_var p_var)`` (variances floored at ``smooth_dr``).

    Args:
        pred, target: ``[B, C, *N]`` images.
        kernel_vol: the filter's volume (sum of its weights over all axes), a 0-dim tensor.
        taps: the symmetric 1D filter, odd length.
        filtering: ``filtering(x, taps)`` filters ``x`` along every spatial axis (zeros outside):
            :func:`padded_filtering` (what Inductor fuses) or the eager loss's
            :func:`~monai_icon.losses.similarity.shifted_filtering`.

    Returns:
        the per-voxel value ``[B, C, *N]`` and the local sums ``[B, 5 C, *N]`` (``t, p, t^2, p^2, t p``) that
        :func:`lncc_backward` needs.
    """
    channels = pred.shape[1]
    sums = filtering(torch.cat([target, pred, target * target, pred * pred, target * pred], dim=1), taps)
    cross, t_var, p_var, _, _ = _terms(sums, channels, kernel_vol, smooth_dr)
    return (cross * cross + smooth_nr) / (t_var * p_var), sums


def lncc_backward(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, sums: torch.Tensor, kernel_vol: torch.Tensor,
    taps: tuple[float, ...], smooth_nr: float, smooth_dr: float, need_pred: bool, need_target: bool,
    filtering: Filtering = padded_filtering,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of ``sum(grad * ncc)`` with respect to ``pred`` and ``target`` (each only if needed), in closed
    form from the local sums (the filter is symmetric and zero-padded, hence self-adjoint: ``d/ds = K * d/dS``)."""
    channels = pred.shape[1]
    cross, t_var, p_var, t_var_raw, p_var_raw = _terms(sums, channels, kernel_vol, smooth_dr)
    t_sum, p_sum = sums[:, :channels], sums[:, channels : 2 * channels]
    denominator = t_var * p_var
    g_cross = grad * 2.0 * cross / denominator  # d / d tp_sum
    ncc_g = grad * (cross * cross + smooth_nr) / denominator
    parts = []
    if need_pred:  # d / d (p_sum, p2_sum)
        g_p_var = -(ncc_g / p_var) * (p_var_raw > smooth_dr)
        parts += [-(g_cross * t_sum + 2.0 * g_p_var * p_sum) / kernel_vol, g_p_var]
    if need_target:  # d / d (t_sum, t2_sum)
        g_t_var = -(ncc_g / t_var) * (t_var_raw > smooth_dr)
        parts += [-(g_cross * p_sum + 2.0 * g_t_var * t_sum) / kernel_vol, g_t_var]
    filtered = filtering(torch.cat([*parts, g_cross], dim=1), taps).split(channels, dim=1)
    g_tp = filtered[-1]
    grad_pred = grad_target = None
    if need_pred:
        grad_pred = filtered[0] + 2.0 * pred * filtered[1] + target * g_tp
    if need_target:
        first = 2 if need_pred else 0
        grad_target = filtered[first] + 2.0 * target * filtered[first + 1] + pred * g_tp
    return grad_pred, grad_target


def _compiled(name: str):
    if _state[name] is None:
        _state[name] = torch.compile(lncc_forward if name == "forward" else lncc_backward, dynamic=False)
    return _state[name]


def _run_compiled(name: str, signature: tuple, *args: Any) -> Any:
    """The compiled ``name`` function on ``args``, or None (the caller then computes eagerly) beyond the signature
    limit or once a compilation has failed (with a warning, after which the loss stays eager in this process)."""
    ran, out = run_compiled(_state, _state["signatures"][name], signature, _MAX_SIGNATURES, lambda: _compiled(name),
                            args, "the LNCC failed ({error}); computing it eagerly.", stacklevel=4)
    return out if ran else None


def compiled_lncc_forward(
    pred: torch.Tensor, target: torch.Tensor, kernel_vol: torch.Tensor, taps: tuple[float, ...], smooth_nr: float,
    smooth_dr: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`lncc_forward` compiled by Inductor, or None where it is not (signature limit, failed compilation)."""
    signature = ("forward", tuple(pred.shape), taps)
    return _run_compiled("forward", signature, pred, target, kernel_vol, taps, float(smooth_nr), float(smooth_dr))


def compiled_lncc_backward(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, sums: torch.Tensor, kernel_vol: torch.Tensor,
    taps: tuple[float, ...], smooth_nr: float, smooth_dr: float, need_pred: bool, need_target: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """:func:`lncc_backward` compiled by Inductor, or None where it is not."""
    signature = ("backward", tuple(pred.shape), taps, need_pred, need_target)
    return _run_compiled("backward", signature, grad.contiguous(), pred, target, sums, kernel_vol, taps,
                         float(smooth_nr), float(smooth_dr), need_pred, need_target)


LNCCBackward = Callable[..., "tuple[torch.Tensor | None, torch.Tensor | None] | None"]


def lncc(
    pred: torch.Tensor, target: torch.Tensor, kernel_vol: torch.Tensor, taps: tuple[float, ...], smooth_nr: float,
    smooth_dr: float,
) -> tuple[torch.Tensor, torch.Tensor, LNCCBackward] | None:
    """The CPU backend's hook in the LNCC similarity: :func:`lncc_forward`'s ``(ncc, sums)`` computed by the compiled
    function, with the backward pass to use for them (:func:`compiled_lncc_backward`: :func:`lncc_backward`'s
    arguments, the gradients or ``None`` where it did not run); ``None`` ("not run") where :func:`use_compiled_lncc`
    declines or the compiled function did not run, and the caller computes the LNCC itself."""
    if not use_compiled_lncc(pred, target):
        return None
    out = compiled_lncc_forward(pred, target, kernel_vol, taps, smooth_nr, smooth_dr)
    return None if out is None else (out[0], out[1], compiled_lncc_backward)
