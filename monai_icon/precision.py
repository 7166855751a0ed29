# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Keeping float32 where mixed precision would hurt: coordinates, and the losses computed from them.

Under ``torch.autocast`` networks run in float16 / bfloat16, which is what makes mixed precision fast. Coordinates
cannot: in float16 a ``[0, 1]`` coordinate is resolved to about 5e-4 (0.1 voxel at 192 voxels), in bfloat16 to
4e-3 (half a voxel at 128). Nor can the similarities: LNCC takes differences of local sums of squares, and mutual
information builds a joint histogram by a matrix product, both of which autocast would run in reduced precision.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["at_least_float32", "autocast_disabled", "cpu_bfloat16_fast", "resolve_cpu_amp"]


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 if it has a lower floating-point precision (float16, bfloat16), else unchanged
    (float32 and float64 tensors are returned as they are, without a copy)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def autocast_disabled(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which ``torch.autocast`` is off for ``device``'s type (nothing to do for device types that
    autocast does not support, e.g. ``meta``)."""
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def cpu_bfloat16_fast() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), whose matrix units run bfloat16
    convolutions faster than float32 ones; without them oneDNN emulates bfloat16 and it is slower."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if callable(check) else False


def resolve_cpu_amp(setting: bool | str) -> bool:
    """A ``cpu_amp`` setting as a bool: ``True`` / ``False`` (or their strings, as ``monai_icon.config.as_bool``
    reads them), or ``"auto"`` for :func:`cpu_bfloat16_fast`."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        return cpu_bfloat16_fast()
    from monai_icon.config import as_bool

    return as_bool(setting, "cpu_amp")
