# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The U-Net's last decoder layer and its output convolution as one convolution on the coarse grid (the backend's
``fused_unet_head``), for evaluation on the CPU.

:class:`~monai_icon.networks.nets.UNet` ends with a transposed convolution (kernel 4, stride 2, padding 1) that
doubles the grid, plus a nearest-upsampled shortcut, concatenated with the input images and followed by a 3×3(×3)
output convolution with ``spatial_dims`` output channels. On a CPU these two full-resolution layers take about half
of the network's time: the output convolution has 3 output channels, and oneDNN's kernels compute 8 at a time.
Everything between the pre-activation and the output is linear, so each output parity (each of the ``2 **
spatial_dims`` fine voxels of a coarse cell) is a 3×3(×3) convolution of the coarse features: one convolution with
``2 ** spatial_dims * spatial_dims`` output channels on the coarse grid gives them all, followed by MONAI's
``pixelshuffle``, with the same multiply-adds as the transposed convolution alone and every vector lane used.

The composition differs from the layers only where the output convolution's zero padding cuts off a transposed
convolution output just outside the fine grid; those terms, on the grid's outer shell, are the same coarse
convolutions over fewer axes of the border slices, removed by inclusion and exclusion (:func:`_correct_shell`).
The result is the layers' value up to float rounding (:func:`unet_head`); the input images' part stays a
convolution on the fine grid. The composed weights are built in float64 once per weights' values and kept.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.utils import pixelshuffle
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from monai_icon.backend.settings import active

__all__ = ["unet_head"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _routing(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis: which transposed-convolution tap ``k`` (0..3) and output-convolution tap ``f`` (-1..1) reach the
    fine voxel of parity ``p`` (0, 1) from coarse tap ``t`` (-1..1): ``transposed[p, f + 1, k, t + 1]`` for the
    transposed convolution's input, ``shortcut[p, f + 1, t + 1]`` for inputs that are constant over a coarse cell
    (the nearest-upsampled shortcut, the transposed convolution's bias)."""
    transposed = torch.zeros(2, 3, 4, 3, dtype=dtype)
    shortcut = torch.zeros(2, 3, 3, dtype=dtype)
    for p, f in itertools.product((0, 1), (-1, 0, 1)):
        cell, r = divmod(p + f, 2)  # the fine voxel p + f lies in coarse cell m + cell, at sub-position r
        shortcut[p, f + 1, cell + 1] = 1.0
        for k in range(4):
            if (k - r - 1) % 2 == 0:  # fine position 2 i - 1 + k of coarse input i
                t = cell - (k - r - 1) // 2
                transposed[p, f + 1, k, t + 1] = 1.0
    return transposed, shortcut


def _route(weight: torch.Tensor, routing: torch.Tensor, dims: int, taps_k: bool) -> torch.Tensor:
    """``weight`` ``[O, I, *f (, *k)]`` routed axis by axis to ``[2] * dims + [O, I] + [3] * dims`` (parities, then
    the channels, then the coarse taps)."""
    out = weight
    for axis in range(dims):
        # the first remaining f axis is at position 2 (after O, I), its k axis at 2 + (dims - axis) when present
        f_dim = 2
        if taps_k:
            k_dim = 2 + (dims - axis)
            out = torch.tensordot(out, routing, dims=([f_dim, k_dim], [1, 2]))  # ... + [p, t]
        else:
            out = torch.tensordot(out, routing, dims=([f_dim], [1]))
    # now [O, I, p1, t1, p2, t2, ...]
    order = [2 + 2 * a for a in range(dims)] + [0, 1] + [3 + 2 * a for a in range(dims)]
    return out.permute(order)


def _fits(x: torch.Tensor, skip: torch.Tensor, up_conv: nn.Module, out_conv: nn.Module) -> bool:
    dims = x.ndim - 2
    if dims not in (2, 3) or x.device.type != "cpu" or x.dtype != torch.float32 or skip.dtype != x.dtype:
        return False
    weights = [*up_conv.parameters(), *out_conv.parameters()]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in weights)):
        return False
    transposed_ok = (isinstance(up_conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)) and up_conv.groups == 1
                     and up_conv.kernel_size == (4,) * dims and up_conv.stride == (2,) * dims
                     and up_conv.padding == (1,) * dims and up_conv.output_padding == (0,) * dims
                     and up_conv.dilation == (1,) * dims)
    out_ok = (isinstance(out_conv, (nn.Conv2d, nn.Conv3d)) and out_conv.groups == 1
              and out_conv.kernel_size == (3,) * dims and out_conv.stride == (1,) * dims
              and out_conv.padding == (1,) * dims and out_conv.dilation == (1,) * dims
              and out_conv.padding_mode == "zeros")
    if not (transposed_ok and out_ok):
        return False
    widths = cast(_ConvNd, out_conv).in_channels == cast(_ConvTransposeNd, up_conv).out_channels + skip.shape[1]
    return widths and tuple(skip.shape[2:]) == tuple(2 * s for s in x.shape[2:]) and skip.shape[0] == x.shape[0]


def unet_head(
    x: torch.Tensor, skip: torch.Tensor, norm: nn.Module, up_conv: nn.Module, negative_slope: float,
    out_conv: nn.Module,
) -> torch.Tensor | None:
    """``out_conv(cat([up_conv(leaky_relu(norm(x))) + shortcut(x), skip]))``, the U-Net's last decoder layer and
    output convolution, where ``shortcut`` takes the first ``up_conv.out_channels`` channels of ``x`` (all of them,
    zero-padded, when it has fewer) upsampled by nearest neighbour, computed as one convolution on ``x``'s grid
    (the module's docstring). Runs where the active backend has ``fused_unet_head``, on CPU float32 tensors without
    autograd, for 2D and 3D, ``skip`` on exactly twice ``x``'s grid, the layers of the U-Net's shapes (transposed
    convolution: kernel 4, stride 2, padding 1; output convolution: kernel 3, padding 1, zero padding), and not
    inside ``torch.jit.trace``. ``None`` elsewhere: the caller runs the layers.

    Shapes:
        ``x`` ``[B, C, *N]``, ``skip`` ``[B, S, *2N]`` -> ``[B, out_conv.out_channels, *2N]``.
    """
    if not active().fused_unet_head or torch.jit.is_tracing() or not _fits(x, skip, up_conv, out_conv):
        return None  # a trace records the layers themselves (portable, any device)
    with torch.no_grad():
        return _fused(x, skip, norm, cast(_ConvTransposeNd, up_conv), negative_slope, cast(_ConvNd, out_conv))


_CACHE: dict[tuple, tuple[tuple, torch.Tensor]] = {}  # composed weights, by the weights they come from
_MAX_CACHED = 256
_LOCK = threading.Lock()


def _cached(sources: tuple[torch.Tensor | None, ...], spec: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, composed from the weights ``sources`` (and ``spec``: which part of them), reused while those
    weights are the same tensors with the same values: the same objects (checked through weak references, so that
    a new tensor at a freed tensor's address is not taken for it), storage and version counter (bumped by every
    in-place update, e.g. an optimiser step or ``load_state_dict``). Entries of freed weights are dropped first when
    the cache is full; safe to call from several threads. Weights made under ``torch.inference_mode`` have no
    version counter: their compositions are built anew at every call. The composed weights are ordinary tensors
    (built outside inference mode), usable in and out of it."""
    if any(t is not None and t.is_inference() for t in sources):
        return build()
    key = (spec, tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in sources))
    with _LOCK:
        entry = _CACHE.get(key)
    if entry is not None and all((ref is None) if t is None else (ref is not None and ref() is t)
                                 for ref, t in zip(entry[0], sources)):
        return entry[1]
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) turns gradients back on
        value = build().detach()
    with _LOCK:
        if len(_CACHE) >= _MAX_CACHED:
            for stale in [k for k, (refs, _) in _CACHE.items() if any(r is not None and r() is None for r in refs)]:
                del _CACHE[stale]
        while len(_CACHE) >= _MAX_CACHED:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = (tuple(None if t is None else weakref.ref(t) for t in sources), value)
    return value


def _composed_weight(w_t: torch.Tensor, w_a: torch.Tensor, constant: torch.Tensor | None = None) -> torch.Tensor:
    """The coarse convolution ``[2^n * O, C (+ K), 3, ...]`` (output channels ordered by channel, then parity,
    as MONAI's ``pixelshuffle`` takes them) that
    gives ``conv(conv_transpose(h, w_t, stride 2, padding 1), w_a, padding 1)`` in the interior, from ``w_t``
    ``[C, M, 4, ...]`` and ``w_a`` ``[O, M, 3, ...]``; with ``constant`` ``[O, K, 3, ...]``, also the output
    convolution of ``K`` inputs constant over each coarse cell (nearest-upsampled ones), appended as input
    channels. Composed in float64."""
    n = w_t.ndim - 2
    transposed, cell = _routing(torch.float64)
    letters = "uvw"[:n]
    through = torch.einsum(f"oj{letters},cj{letters.upper()}->oc{letters}{letters.upper()}",
                           w_a.to(torch.float64), w_t.to(torch.float64))
    weight = _route(through, transposed, n, taps_k=True)
    if constant is not None:
        weight = torch.cat([weight, _route(constant.to(torch.float64), cell, n, taps_k=False)], dim=n + 1)
    weight = weight.movedim(n, 0)  # [O, *parities, C (+ K), *taps]
    return weight.reshape(w_a.shape[0] * 2 ** n, *weight.shape[n + 1:]).to(w_t.dtype)


def _coarse(h: torch.Tensor, up_weight: torch.Tensor, out_weight: torch.Tensor, mid: int,
            sides: tuple[int | None, ...]) -> torch.Tensor:
    """The coarse convolution of :func:`_composed_weight` over the spatial axes of ``h`` ``[B, C, *N]`` (0 to 3),
    pixel-shuffled to ``[B, O, *2N]``: ``conv(conv_transpose(h, w_t, stride 2, padding 1), w_a, padding 1)`` (no
    biases) but for what passes through the transposed convolution's outputs just outside the fine grid
    (:func:`_correct_shell`). ``w_t`` and ``w_a`` are the transposed convolution's weight ``up_weight`` and the
    first ``mid`` input channels of the output convolution's ``out_weight``, at the taps of ``sides`` along the axes
    that ``h`` no longer has (see :func:`_correct_shell`)."""
    t_index = (slice(None), slice(None), *[slice(None) if side is None else (0, 3)[side] for side in sides])
    o_index = (slice(None), slice(0, mid), *[slice(None) if side is None else (0, 2)[side] for side in sides])
    w_t, w_a = up_weight[t_index], out_weight[o_index]
    n = h.ndim - 2
    if n == 0:
        return (h @ w_t) @ w_a.T
    weight = _cached((up_weight, out_weight), ("coarse", mid, sides), lambda: _composed_weight(w_t, w_a))
    return pixelshuffle(_CONV[n](h, weight, None, padding=1), n, 2)


def _correct_shell(out: torch.Tensor, h: torch.Tensor, up_weight: torch.Tensor, out_weight: torch.Tensor,
                   mid: int) -> None:
    """Make a coarse convolution's ``out`` exact at the borders. It adds, through the transposed convolution's
    outputs just outside the fine grid (fine index -1, from coarse index 0 with tap 0; fine index ``2 n``, from
    coarse index ``n - 1`` with tap 3), terms that the output convolution's zero padding cuts off (its tap 0 at
    fine index 0, its tap 2 at fine index ``2 n - 1``). The terms through a given set of outside axes (and sides)
    are those of the coarse convolution over the other axes of ``h``'s border slice there (:func:`_coarse`),
    written on the output's border slice; by inclusion and exclusion over the sets of axes (sign
    ``(-1) ** len(axes)``) every cut-off term is removed exactly once."""
    coarse = tuple(h.shape[2:])
    for sides in itertools.product((None, 0, 1), repeat=len(coarse)):
        outside = sum(side is not None for side in sides)
        if not outside:
            continue
        h_index = (slice(None), slice(None),
                   *[slice(None) if side is None else (0, size - 1)[side] for side, size in zip(sides, coarse)])
        out_index = (slice(None), slice(None),
                     *[slice(None) if side is None else (0, 2 * size - 1)[side] for side, size in zip(sides, coarse)])
        piece = _coarse(h[h_index], up_weight, out_weight, mid, sides)
        if outside % 2:
            out[out_index] -= piece
        else:
            out[out_index] += piece


def _fused(x: torch.Tensor, skip: torch.Tensor, norm: nn.Module, up_conv: _ConvTransposeNd, negative_slope: float,
           out_conv: _ConvNd) -> torch.Tensor:
    n = x.ndim - 2
    mid = up_conv.out_channels
    shortcut = min(x.shape[1], mid)  # the shortcut's channels (zero-padded beyond x's)
    memory_format = torch.channels_last_3d if n == 3 else torch.channels_last
    h = F.leaky_relu(norm(x), negative_slope)
    layout = memory_format if h.is_contiguous(memory_format=memory_format) else torch.contiguous_format
    inputs = [h, x[:, :shortcut]]
    if up_conv.bias is not None:  # the transposed convolution's bias: a channel of ones on the coarse grid
        inputs.append(torch.ones_like(x[:, :1]))

    def build() -> torch.Tensor:
        w_a = out_conv.weight[:, :mid]
        constant = w_a[:, :shortcut]  # the output convolution of the inputs constant over a coarse cell
        if up_conv.bias is not None:
            constant = torch.cat([constant, torch.einsum("oj...,j->o...", w_a, up_conv.bias).unsqueeze(1)], dim=1)
        return _composed_weight(up_conv.weight, w_a, constant).contiguous(memory_format=layout)

    weight = _cached((up_conv.weight, up_conv.bias, out_conv.weight), ("head", mid, shortcut, layout), build)
    bias = None if out_conv.bias is None else out_conv.bias.repeat_interleave(2 ** n)
    out = pixelshuffle(_CONV[n](torch.cat(inputs, dim=1), weight, bias, padding=1), n, 2)
    out += _CONV[n](skip, out_conv.weight[:, mid:], None, padding=1)
    _correct_shell(out, h, up_conv.weight, out_conv.weight, mid)
    return out
