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

import gzip
import math
import os
from collections.abc import Mapping, Sequence
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
    "check_grid_budget",
    "check_side",
    "check_device",
    "check_output_path",
    "check_label_values",
    "check_image_geometry",
    "check_nifti_header",
    "check_finite",
    "same_file",
    "check_outputs_spare_inputs",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
MIN_SPACING_MM = 1e-3
# memory per voxel of a grid that images are registered on (network activations, maps, fields, gradients): a
# bound, not a measurement; grids that exceed the available memory by it are refused before anything is allocated
GRID_BYTES_PER_VOXEL = 1024


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


def check_grid_budget(size: Sequence[int] | None, name: str, bytes_per_voxel: int = GRID_BYTES_PER_VOXEL,
                      limit_bytes: int | None = None) -> None:
    """Refuse a grid that cannot fit: ``prod(size) * bytes_per_voxel`` against ``limit_bytes`` (default: the
    memory available now, :func:`monai_icon.memory.available_memory`)."""
    if size is None:
        return
    from monai_icon.memory import available_memory

    voxels = math.prod(int(v) for v in size)
    limit_bytes = available_memory() if limit_bytes is None else limit_bytes
    if limit_bytes is not None and voxels * bytes_per_voxel > limit_bytes:
        raise ValueError(f"{name} {list(size)} is {voxels:,} voxels: registering on it needs about "
                         f"{voxels * bytes_per_voxel / 2**30:.1f} GiB but {limit_bytes / 2**30:.1f} GiB of memory is "
                         "available; use a smaller grid.")


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
    matrix = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} has a voxel-to-world affine with NaN or infinite entries (origin, spacing or "
                         f"direction): {np.round(matrix, 4).tolist()}.")
    linear = matrix[:dims, :dims]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM):
        raise ValueError(f"{name} has degenerate voxel spacing {np.round(spacing, 6).tolist()} mm "
                         f"(each axis must be >= {MIN_SPACING_MM} mm).")
    if abs(np.linalg.det(linear)) < MIN_SPACING_MM ** dims:
        raise ValueError(f"{name} has a degenerate (singular) voxel-to-world matrix.")
    if spatial_dims is not None and spatial_dims == dims and min(shape) < 2:
        raise ValueError(f"{name} has a single slice along an axis (shape {tuple(shape)}): a {spatial_dims}D "
                         "model needs at least 2 voxels per axis.")


def check_nifti_header(path: str | Path, what: str = "image") -> None:
    """The orientation a NIfTI header states must be usable: readers silently fall back to another (or an
    identity) affine when the sform or qform holds NaN, a zero column or a singular matrix, so such a file is
    refused here instead of being registered in the wrong place.

    Raises:
        ValueError: names the file, the transform (sform, qform or pixdim) and the problem.
    """
    import nibabel as nib

    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:  # the header as stored (nibabel's loader silently repairs some fields, e.g. zero voxel sizes)
        with opener(path, "rb") as stream:
            header = nib.Nifti1Header.from_fileobj(stream, check=False)
    except Exception:  # noqa: BLE001 - not readable as NIfTI-1: the image reader reports it
        return
    dims = int(min(max(int(header["dim"][0]), 1), 3))
    pixdim = np.asarray(header["pixdim"][1: dims + 1], dtype=np.float64)
    where = f"the {what} {path}"
    if int(header["sform_code"]) > 0:
        srow = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)
        if not np.isfinite(srow).all():
            raise ValueError(f"{where} has NaN or infinite values in its sform (its voxel-to-world matrix); fix the "
                             "header or set sform_code to 0.")
        columns = np.linalg.norm(srow[:, :dims], axis=0)
        if np.any(columns < MIN_SPACING_MM):
            axis = int(np.argmin(columns))
            raise ValueError(f"{where} has degenerate voxel spacing in its sform: axis {axis} is "
                             f"{columns[axis]:.3g} mm long (each axis must be >= {MIN_SPACING_MM} mm).")
        if dims == 3 and abs(np.linalg.det(srow[:, :3])) < MIN_SPACING_MM ** 3:
            raise ValueError(f"{where} has a singular sform (its voxel-to-world matrix has no inverse).")
    if int(header["qform_code"]) > 0:
        quaternion = np.asarray([header[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                                                     "qoffset_y", "qoffset_z")], dtype=np.float64)
        if not np.isfinite(quaternion).all():
            raise ValueError(f"{where} has NaN or infinite values in its qform (rotation or origin); fix the header "
                             "or set qform_code to 0.")
    if not np.isfinite(pixdim).all() or np.any(np.abs(pixdim) < MIN_SPACING_MM):
        if int(header["sform_code"]) == 0:  # the voxel sizes are part of the affine used
            raise ValueError(f"{where} has voxel sizes (pixdim) {pixdim.tolist()}: each must be a finite number >= "
                             f"{MIN_SPACING_MM} mm.")


def check_finite(values: torch.Tensor | np.ndarray, name: str) -> None:
    """Refuse NaN or infinite values, with their count."""
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        count = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} holds {count} NaN or infinite value(s).")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file: the same path, a symbolic link to it, or a hard link (same device and
    inode); for a path that does not exist yet, the same resolved location."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs_spare_inputs(outputs: Mapping[str, str | Path | None],
                               inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse, before any computation, an output that would overwrite an input (by path, symbolic link or hard
    link; for detached ``.mhd``/``.nhdr`` outputs, also their data files), or two outputs that are one file.

    Args:
        outputs, inputs: ``{role: path}`` (``None`` entries are skipped); roles name the files in the message.

    Raises:
        ValueError: ``"<output role> <path> would overwrite the <input role> <path>"``.
    """
    from monai_icon.apps.atomic_io import companion_files

    given_outputs = [(role, Path(path)) for role, path in outputs.items() if path is not None]
    given_inputs = [(role, Path(path)) for role, path in inputs.items() if path is not None]
    given_inputs += [(f"{role}'s data file", data) for role, path in given_inputs for data in companion_files(path)
                     if data.exists()]
    for i, (role, path) in enumerate(given_outputs):
        for target in (path, *companion_files(path)):
            for input_role, input_path in given_inputs:
                if same_file(target, input_path):
                    link = "" if os.path.abspath(target) == os.path.abspath(input_path) else " (a link to it)"
                    raise ValueError(f"{role} {str(path)!r} would overwrite the {input_role} {str(input_path)!r}"
                                     f"{link}; write the output elsewhere.")
        for other_role, other in given_outputs[i + 1:]:
            if same_file(path, other):
                raise ValueError(f"{role} and {other_role} are the same file {str(path)!r}.")
