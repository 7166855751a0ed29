# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Checks of user input for the file API and the command line: each raises a ``ValueError`` (or
``FileNotFoundError``) whose message names the argument and the problem, before any computation starts.

Outputs are checked up front (folder creatable and writable, no file in the way, a supported extension) so that a
long registration does not fail when it tries to write its result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_SPACING_MM",
    "TRANSFORM_SUFFIXES",
    "check_count",
    "check_positive_number",
    "check_fraction",
    "check_interval",
    "check_sizes",
    "check_side",
    "check_device",
    "check_output_path",
    "check_label_values",
    "check_image_geometry",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
MIN_SPACING_MM = 1e-3


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """An integer ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_positive_number(value: Any, name: str) -> float:
    """A finite number ``> 0`` (NaN, infinities, zero and negatives refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """A number in ``[low, high)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value < high):
        raise ValueError(f"{name} must lie in [{low}, {high}), got {value!r}.")
    return float(value)


def check_interval(values: Sequence[float] | None, name: str, low: float = -math.inf,
                   high: float = math.inf) -> tuple[float, float] | None:
    """Two finite, increasing numbers within ``[low, high]`` (an empty or reversed range is refused)."""
    if values is None:
        return None
    values = list(values)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be two finite numbers (low,high), got {values!r}.")
    if not values[0] < values[1]:
        raise ValueError(f"{name} must be increasing (low < high), got an empty or reversed range {values!r}.")
    if values[0] < low or values[1] > high:
        raise ValueError(f"{name} must lie within [{low}, {high}], got {values!r}.")
    return float(values[0]), float(values[1])


def check_sizes(values: Sequence[Any] | None, name: str, length: int | None = None, minimum: float = 1,
                integer: bool = True) -> list | None:
    """A list of ``length`` sizes each ``>= minimum`` (grid sizes: integers; spacings: ``integer=False``)."""
    if values is None:
        return None
    values = list(values)
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} values, got {len(values)}: {values!r}.")
    for v in values:
        bad_type = isinstance(v, bool) or not isinstance(v, (int, np.integer) if integer else (int, float, np.number))
        if bad_type or not math.isfinite(v) or v < minimum:
            kind = "integers" if integer else "finite numbers"
            raise ValueError(f"{name} must be {kind} >= {minimum}, got {values!r}.")
    return values


def check_side(side: str | None, name: str) -> str | None:
    """``LEFT``/``RIGHT`` (any case) or None."""
    if side is None:
        return None
    if not isinstance(side, str) or side.strip().upper() not in ("LEFT", "RIGHT"):
        raise ValueError(f"{name} must be LEFT or RIGHT, got {side!r}.")
    return side.strip().upper()


def check_device(device: str | torch.device | None) -> torch.device | None:
    """A torch device that exists on this machine (``cuda`` without a GPU, an out-of-range index or an unknown
    name is refused)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available on this machine "
                             "(use --device cpu).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist ({torch.cuda.device_count()} CUDA devices).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but is not available on this machine.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}; use cpu or cuda.")
    return device


def check_output_path(path: str | Path | None, name: str, suffixes: Sequence[str]) -> Path | None:
    """An output file that can be written: a supported extension, no file where a folder must be, an existing
    folder writable (or a missing one creatable below a writable folder), and not an existing folder itself."""
    if path is None:
        return None
    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{name} {str(path)!r}: unsupported extension; use one of {', '.join(suffixes)}.")
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder, not a file name.")
    parent = path.parent.absolute()
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be written: {str(ancestor)!r} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(path)!r} cannot be written: the folder {str(ancestor)!r} is not writable.")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{name} {str(path)!r} exists and is read-only.")
    return path


def check_label_values(label: torch.Tensor | np.ndarray, name: str) -> None:
    """A label map: integer values ``>= 0`` (a float image given as labels is refused)."""
    values = torch.as_tensor(np.asarray(label)).flatten()
    if values.is_floating_point():
        fractional = values[values != values.round()]
        if fractional.numel():
            raise ValueError(f"{name} is not a label map: it holds non-integer values (e.g. "
                             f"{float(fractional[0]):.4g}); give an integer-valued segmentation.")
    if values.numel() and float(values.min()) < 0:
        raise ValueError(f"{name} holds negative labels ({float(values.min()):g}); labels must be >= 0.")


def check_image_geometry(affine: np.ndarray, shape: Sequence[int], name: str, spatial_dims: int | None = None) -> None:
    """Voxel spacing not (nearly) zero and, for a ``spatial_dims``-D model, at least two voxels along every axis
    (a single-slice volume cannot be registered by a 3D model)."""
    dims = len(shape)
    linear = np.asarray(affine, dtype=np.float64)[:dims, :dims]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM):
        raise ValueError(f"{name} has degenerate voxel spacing {np.round(spacing, 6).tolist()} mm "
                         f"(each axis must be >= {MIN_SPACING_MM} mm).")
    if abs(np.linalg.det(linear)) < MIN_SPACING_MM ** dims:
        raise ValueError(f"{name} has a degenerate (singular) voxel-to-world matrix.")
    if spatial_dims is not None and spatial_dims == dims and min(shape) < 2:
        raise ValueError(f"{name} has a single slice along an axis (shape {tuple(shape)}): a {spatial_dims}D "
                         "model needs at least 2 voxels per axis.")
