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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from monai_icon.apps.files import OutputFiles, PairFiles
    from monai_icon.apps.model_files import RegistrationModel
    from monai_icon.engines.instance_optimisation import Refinement

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
    "FLAG_NAMES",
    "MAX_PASSES",
    "check_registration_arguments",
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
MIN_SPACING_MM = 1e-3
# memory per voxel of a grid that images are registered on (network activations, maps, fields, gradients): a
# bound, not a measurement; grids that exceed the available memory by it are refused before anything is allocated
GRID_BYTES_PER_VOXEL = 1024
#: the most network passes (``--passes``; each a full network evaluation on the images warped by the maps so far)
MAX_PASSES = 16
#: the command-line flags that name their settings in the messages of :func:`check_registration_arguments`
FLAG_NAMES = {"io_steps": "--io-steps", "io_lr": "--io-lr", "io_levels": "--io-levels",
              "io_fine_steps": "--io-fine-steps", "io_size": "--io-size", "io_field_size": "--io-field-size",
              "spatial_size": "--spatial-size", "passes": "--passes", "lncc_kernel": "--lncc-kernel",
              "flip_axes": "--flip-axes", "io_smoothness": "--io-smoothness", "io_voxels": "--io-voxels",
              "flip_passes": "--flip-passes"}


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


def check_registration_arguments(
    refinement: Refinement,
    label_weight: float = 0.0,
    *,
    inputs: PairFiles | None = None,
    outputs: OutputFiles | None = None,
    model: RegistrationModel | str | Path | None = None,
    passes: int | None = None,
    lncc_kernel: int | None = None,
    spatial_size: Sequence[int] | None = None,
    flip_axes: Sequence[int] | None = None,
    flip_passes: int | None = None,
    names: Mapping[str, str] | None = None,
    fit_levels: bool = False,
    masks: bool = False,
) -> Refinement:
    """Every check of the arguments of a registration, for :func:`monai_icon.apps.register_files` (and
    :func:`~monai_icon.apps.register_images`, :func:`~monai_icon.apps.register_pairs`) and ``monai-icon register``
    / ``register-pairs`` alike, before any computation. Parts not given are not checked: the command line checks
    its flags before loading the model, then again with the model; the files are checked by ``register_files``.

    Args:
        refinement: the instance-optimisation settings (``lr=None``: the mode's
            :data:`~monai_icon.engines.instance_optimisation.DEFAULT_IO_LR`).
        label_weight: the weight of the label term of instance optimisation (``>= 0``).
        inputs, outputs: the files (:class:`~monai_icon.apps.files.PairFiles`,
            :class:`~monai_icon.apps.files.OutputFiles`): sides, masks in pairs, labels for ``label_weight``,
            outputs writable and not overwriting an input (``outputs`` needs ``inputs``).
        model: a :class:`~monai_icon.apps.RegistrationModel` (the grids' dimension, the levels its grids allow, the
            LNCC window and the flipped axes against its grid), or a model file (only kept from being overwritten).
        passes, lncc_kernel, spatial_size, flip_axes, flip_passes: the test-time settings of the command line
            (``None``: not given).
        names: how messages name the settings (e.g. :data:`FLAG_NAMES` for the command line's flags); by default the
            keyword names.
        fit_levels: fewer levels when the residual grid cannot be halved as often as ``refinement.levels`` asks
            (a preset's levels on a small grid) instead of refusing them.
        masks: masks are given (as tensors; with ``inputs``, its mask files count too).

    Returns:
        ``refinement`` with its learning rate filled in (and its levels fitted with ``fit_levels``).

    Raises:
        ValueError: the first problem, naming the argument.
    """
    from dataclasses import replace

    from monai_icon.apps.model_files import RegistrationModel
    from monai_icon.engines.instance_optimisation import IO_MODES, RESIDUAL_MODES, default_io_lr, pyramid_shapes

    def name(key: str) -> str:
        return (names or {}).get(key, key)

    steps = check_count(refinement.steps, name("io_steps"))
    if refinement.mode not in IO_MODES:
        raise ValueError(f"io_mode must be one of {IO_MODES}, got {refinement.mode!r}.")
    lr = check_positive_number(default_io_lr(refinement.mode) if refinement.lr is None else refinement.lr,
                               name("io_lr"))
    levels = check_count(refinement.levels, name("io_levels"), minimum=1)
    if passes is not None and check_count(passes, name("passes"), minimum=1) > MAX_PASSES:
        raise ValueError(f"{name('passes')} must be at most {MAX_PASSES} (each pass is a full network evaluation on "
                         f"images warped by the maps so far), got {passes}.")
    if flip_passes is not None:
        check_count(flip_passes, name("flip_passes"))
    if refinement.fine_steps is not None:
        check_count(refinement.fine_steps, name("io_fine_steps"))
    for key, size in (("spatial_size", spatial_size), ("io_size", refinement.size),
                      ("io_field_size", refinement.field_size)):
        check_sizes(size, name(key), minimum=2)
        check_grid_budget(size, name(key))
    if lncc_kernel is not None and (isinstance(lncc_kernel, bool) or not isinstance(lncc_kernel, int)
                                    or lncc_kernel < 3 or lncc_kernel % 2 != 1):
        raise ValueError(f"{name('lncc_kernel')} must be an odd number >= 3, got {lncc_kernel}.")
    if not (isinstance(label_weight, (int, float)) and 0 <= label_weight < float("inf")):
        raise ValueError(f"label_weight must be a finite number >= 0, got {label_weight!r}.")
    if levels > 1 and refinement.mode not in RESIDUAL_MODES:
        raise ValueError(f"io_levels > 1 needs io_mode 'residual' or 'one-way' (coarse-to-fine residual fields), got "
                         f"io_levels {levels} with io_mode={refinement.mode!r}.")
    for key, size in (("io_size", refinement.size), ("io_field_size", refinement.field_size)):
        if size is not None and refinement.mode not in RESIDUAL_MODES:
            raise ValueError(f"{name(key)} {list(size)} needs io_mode 'residual' or 'one-way' (residual fields on that "
                             f"grid), got io_mode={refinement.mode!r}.")
    smoothness = refinement.smoothness
    if isinstance(smoothness, bool) or not isinstance(smoothness, (int, float)) or not 0 <= smoothness < float("inf"):
        raise ValueError(f"{name('io_smoothness')} must be a finite number >= 0, got {smoothness!r}.")
    if refinement.voxels is not None:
        voxels = refinement.voxels
        if refinement.mode not in RESIDUAL_MODES:
            raise ValueError(f"{name('io_voxels')} needs io_mode 'residual' or 'one-way', got {refinement.mode!r}.")
        if isinstance(voxels, bool) or not isinstance(voxels, int) or voxels < 4**3:
            raise ValueError(f"{name('io_voxels')} must be an integer >= 64, got {voxels!r}.")
        check_grid_budget([voxels], name("io_voxels"))
    if refinement.mode == "one-way" and steps > 0:
        has_masks = masks or (inputs is not None and inputs.fixed_mask is not None)
        if has_masks or label_weight > 0:
            raise ValueError("io_mode 'one-way' compares the images alone: it takes no masks and no label_weight "
                             "(use io_mode 'residual' for those).")
    if inputs is not None:
        check_side(inputs.fixed_side, "fixed_side")
        check_side(inputs.moving_side, "moving_side")
        if (inputs.fixed_mask is None) != (inputs.moving_mask is None):
            raise ValueError("give both masks (fixed_mask and moving_mask) or neither.")
        if label_weight > 0 and (inputs.fixed_label is None or inputs.moving_label is None or steps == 0):
            raise ValueError("label_weight > 0 needs fixed_label, moving_label and io_steps > 0 (it weights the label "
                             "term of instance optimisation).")
    if outputs is not None:
        if inputs is None:
            raise ValueError("the outputs are checked against the inputs: give both.")
        if (inputs.moving_label is None) != (outputs.warped_label is None):
            raise ValueError("give both moving_label and warped_label, or neither.")
        if not any(outputs.roles().values()):
            raise ValueError("nothing to write: give at least one of warped, ddf, transform, warped_label.")
        for key, path in outputs.roles().items():
            check_output_path(path, key, TRANSFORM_SUFFIXES if key == "transform" else IMAGE_SUFFIXES)
        model_file = model if isinstance(model, (str, Path)) and Path(model).is_file() else None
        check_outputs_spare_inputs(outputs.roles(), {**inputs.roles(), "model file": model_file})
    if isinstance(model, RegistrationModel):
        dims = model.spatial_dims
        for key, size in (("io_size", refinement.size), ("io_field_size", refinement.field_size)):
            if size is not None and len(size) != dims:
                raise ValueError(f"{name(key)} {list(size)} must have {dims} values (the model is {dims}D).")
        flips = list(flip_axes or [])
        if any(a < 0 or a >= dims for a in flips):
            raise ValueError(f"{name('flip_axes')} {flips} must be axes of the model's {dims}D grid (0 .. {dims - 1}).")
        compared = list(refinement.size or model.spatial_size)
        if lncc_kernel is not None:
            if model.similarity != "lncc":
                raise ValueError(f"{name('lncc_kernel')} needs the lncc similarity (--similarity lncc); the model's is "
                                 f"{model.similarity!r}.")
            if lncc_kernel > min(compared):
                raise ValueError(f"{name('lncc_kernel')} {lncc_kernel} is larger than the grid the images are compared "
                                 f"on ({compared}); use at most {min(compared) - (1 - min(compared) % 2)}.")
        field = list(refinement.field_size or refinement.size or model.spatial_size)
        distinct = len(dict.fromkeys(pyramid_shapes(field, levels)))
        if distinct < levels and fit_levels:
            levels = distinct  # a preset on a small grid: as many levels as it has
        elif distinct < levels:
            raise ValueError(f"{name('io_levels')} {levels} is more than the residual grid {field} can be halved "
                             f"(at least 2 voxels per axis): use at most {distinct}.")
    return replace(refinement, lr=lr, levels=levels)
