# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The CPU backend's one setting: :class:`CPUBackend` (what is asked for), :class:`ResolvedBackend` (what runs on a
device) and :func:`use_backend`, the one place that sets the active settings.

The active settings live in a :class:`contextvars.ContextVar`: each thread (and each ``asyncio`` task) has its own,
and :func:`use_backend` restores the previous value on exit, so nested and concurrent uses do not disturb one another.
Outside any :func:`use_backend` the settings are :data:`DEFAULT`: the optimisations that need no compilation (the
planar and threaded samplers, the matrix resize, the quantiles by selection; they apply to CPU tensors only and give
PyTorch's values up to rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Union

import torch

from monai_icon.backend.allocator import tune_cpu_allocator
from monai_icon.backend.compilation import compiler_available

__all__ = [
    "BACKEND_MODES", "CPUBackend", "DEFAULT", "ResolvedBackend", "active", "as_backend", "tune_allocator_for",
    "use_backend",
]

#: the values of :attr:`CPUBackend.mode`
BACKEND_MODES = ("auto", "on", "off")
_KERNELS = ("fast_sampler", "compiled_lncc", "planar_sampler", "threaded_sampler", "matrix_resize", "fused_unet_head",
            "tune_allocator",
            "channels_last", "selection_quantiles")


@dataclasses.dataclass(frozen=True)
class ResolvedBackend:
    """Which CPU optimisations run (all off: the plain PyTorch operations everywhere).

    Attributes:
        fast_sampler: large trilinear warps of 3D float32 CPU images without gradients by a gather loop compiled by
            ``torch.compile`` (:func:`monai_icon.backend.trilinear.fast_trilinear_interpolate`).
        compiled_lncc: the LNCC of large float32 CPU images, and its gradient, by loops compiled by
            ``torch.compile`` (:mod:`monai_icon.backend.lncc_kernels`).
        planar_sampler: large trilinear samplings of 3D float32 CPU fields by PyTorch's vectorised 2D kernel
            (:func:`monai_icon.backend.trilinear.planar_trilinear_interpolate`; no compilation).
        threaded_sampler: ``grid_sample`` on the CPU of a batch smaller than the thread count split into
            pseudo-batches, so that every thread works (its 3D kernel parallelises over the batch only; the same
            values).
        matrix_resize: linear resizing of CPU fields as one matrix product per axis
            (:func:`monai_icon.backend.resize.resize`; no compilation, the same values up to rounding).
        fused_unet_head: the U-Net's last decoder layer and output convolution as one convolution on the coarse
            grid when evaluated without autograd (:func:`monai_icon.backend.unet_output.unet_head`; no compilation,
            the same values up to rounding).
        tune_allocator: glibc's ``malloc`` keeps freed blocks for reuse (:func:`monai_icon.backend.allocator.
            tune_cpu_allocator`; once per process, when the settings are first entered).
        channels_last: a trainer keeps the network's weights and the images channels-last.
        selection_quantiles: intensity percentiles of CPU images by partial sorting instead of a full sort
            (:func:`monai_icon.backend.quantiles.quantiles`; no compilation, the same values up to rounding).
    """

    fast_sampler: bool = False
    compiled_lncc: bool = False
    planar_sampler: bool = False
    threaded_sampler: bool = False
    matrix_resize: bool = False
    fused_unet_head: bool = False
    tune_allocator: bool = False
    channels_last: bool = False
    selection_quantiles: bool = False


#: the settings outside any :func:`use_backend`
DEFAULT = ResolvedBackend(planar_sampler=True, threaded_sampler=True, matrix_resize=True, fused_unet_head=True,
                          selection_quantiles=True)
_OFF = ResolvedBackend()
_ACTIVE: contextvars.ContextVar[ResolvedBackend] = contextvars.ContextVar("monai_icon_cpu_backend", default=DEFAULT)


@dataclasses.dataclass(frozen=True)
class CPUBackend:
    """The CPU optimisations as one setting; they change speed, not results (the same values up to float rounding).

    Args:
        mode: ``"auto"`` (default): on a CPU, every optimisation that pays there (the planar and threaded samplers,
            the fused U-Net output, allocator tuning, channels-last training, and the compiled sampler and LNCC
            where a C++ compiler is found);
            ``"on"``: all of them (the compiled ones still fall back to PyTorch's operations without a compiler);
            ``"off"``: none. On any other device (CUDA, ...) everything is off whatever the mode.
        fast_sampler, compiled_lncc, planar_sampler, threaded_sampler, matrix_resize, fused_unet_head, tune_allocator,
        channels_last, selection_quantiles: for experts,
            one optimisation on
            (``True``) or off (``False``) whatever the mode; ``None`` follows the mode. Still off on other devices.

    Raises:
        ValueError: an unknown ``mode``.
        TypeError: a per-optimisation value that is not ``True``, ``False`` or ``None``.

    The compiled kernels wait for ``torch.compile`` the first time each input shape is seen in a process (longest the
    first time on a machine; PyTorch's on-disk cache keeps the kernels): they pay over a training run or many
    registrations.
    """

    mode: str = "auto"
    fast_sampler: bool | None = None
    compiled_lncc: bool | None = None
    planar_sampler: bool | None = None
    threaded_sampler: bool | None = None
    matrix_resize: bool | None = None
    fused_unet_head: bool | None = None
    tune_allocator: bool | None = None
    channels_last: bool | None = None
    selection_quantiles: bool | None = None

    def __post_init__(self) -> None:
        mode = self.mode.strip().lower() if isinstance(self.mode, str) else self.mode
        if mode not in BACKEND_MODES:
            raise ValueError(f"cpu_backend must be one of {', '.join(BACKEND_MODES)}, got {self.mode!r}.")
        object.__setattr__(self, "mode", mode)
        for name in _KERNELS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None (follow the mode), got {value!r}.")

    def resolve(self, device: torch.device | str) -> ResolvedBackend:
        """The optimisations that run on ``device``: none unless it is the CPU, otherwise those of the mode with the
        per-optimisation values applied."""
        if torch.device(device).type != "cpu":
            return _OFF
        on = self.mode != "off"
        compiled = on and (self.mode == "on" or compiler_available())
        chosen = {"fast_sampler": compiled, "compiled_lncc": compiled, "planar_sampler": on, "threaded_sampler": on,
                  "matrix_resize": on, "fused_unet_head": on, "tune_allocator": on, "channels_last": on,
                  "selection_quantiles": on}
        chosen.update({name: getattr(self, name) for name in _KERNELS if getattr(self, name) is not None})
        return ResolvedBackend(**chosen)


BackendLike = Union[CPUBackend, ResolvedBackend, str]


def as_backend(value: CPUBackend | str) -> CPUBackend:
    """``value`` as a :class:`CPUBackend` (a mode string, e.g. a config's or a command line's, or a backend)."""
    if isinstance(value, CPUBackend):
        return value
    if isinstance(value, str):
        return CPUBackend(value)
    raise TypeError(f"cpu_backend must be a monai_icon.backend.CPUBackend or one of {', '.join(BACKEND_MODES)}, "
                    f"got {value!r}.")


def active() -> ResolvedBackend:
    """The settings in force here (this thread, this context); all off inside ``torch.compile``, whose code fuses its
    own loops (and which does not trace a context variable)."""
    if torch.compiler.is_compiling():
        return _OFF
    return _ACTIVE.get()


_tuned: dict[str, bool] = {}  # the process's allocator, tuned once: {"applied": tune_cpu_allocator()'s result}


def _tune_once(settings: ResolvedBackend) -> bool:
    if settings.tune_allocator and "applied" not in _tuned:
        _tuned["applied"] = tune_cpu_allocator()
    return _tuned.get("applied", False)


def tune_allocator_for(backend: CPUBackend | str, device: torch.device | str) -> bool:
    """Tune the process's CPU allocator now (once per process) where ``backend`` has ``tune_allocator`` on
    ``device`` (never for a GPU), as :func:`use_backend` does when first entered: for runs that enter no backend
    themselves, e.g. a bundle's evaluation. Returns whether the allocator is tuned."""
    return _tune_once(as_backend(backend).resolve(device))


@contextlib.contextmanager
def use_backend(backend: BackendLike, device: torch.device | str | None = None) -> Iterator[ResolvedBackend]:
    """Within this context the CPU optimisations of ``backend`` on ``device`` are in force (in this thread and
    context only); the previous settings are restored on exit.

    Args:
        backend: a :class:`CPUBackend`, its mode (``"auto"``, ``"on"``, ``"off"``), or a :class:`ResolvedBackend`
            taken as it is (``device`` is then not consulted).
        device: the device the work runs on (needed unless ``backend`` is resolved); other than the CPU, everything
            is off.

    Raises:
        TypeError: no ``device`` for a backend that is not resolved.

    Yields:
        the settings in force. The first entry with ``tune_allocator`` tunes the process's CPU allocator (it stays
        tuned afterwards: it only changes how freed memory is reused).
    """
    if isinstance(backend, ResolvedBackend):
        settings = backend
    else:
        backend = as_backend(backend)
        if device is None:
            raise TypeError("use_backend needs the device the work runs on (the CPU optimisations are off elsewhere).")
        settings = backend.resolve(device)
    _tune_once(settings)
    var = _ACTIVE
    token = var.set(settings)
    try:
        yield settings
    finally:
        var.reset(token)
