# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Register image files with a trained model: Python API behind ``monai-icon register``.

A *registration model* is a network plus how images reach it (grid size, orientation, intensity percentiles,
knee side) and the loss used for optional instance optimisation. It is read from

* a model file written by :func:`save_registration_model` (``.pt``: the network's declarative spec, weights and
  settings; the 3D knee configs write one at the end of training). A model file is data: it is read with
  ``weights_only=True`` and its network is built by :func:`monai_icon.networks.spec.build_network`, which accepts
  only allowed ``_target_`` names and literal arguments and never evaluates config expressions, or
* a MONAI bundle folder (trusted: its configs are code, run by MONAI's ``ConfigParser``):
  ``configs/inference.json|yaml`` with ``network_def`` and ``spatial_size`` (optionally
  ``axcodes``, ``percentiles``, ``target_side``, ``similarity``, ``lmbda``, ``regularizer``) and the weights in
  its ``model_file`` (default ``models/model.pt``; a model file of :func:`save_registration_model` works too), or
* a published ICON / GradICON / uniGradICON weights file with its ``kind`` (:mod:`monai_icon.networks.pretrained`).
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from torch.nn.modules.loss import _Loss

from monai_icon.apps.atomic_io import write_text
from monai_icon.apps.physical import (
    check_memory,
    fixed_to_moving_world,
    label_dtype,
    load_image,
    sample_labels,
    sample_world,
    to_network_grid,
    unit_to_world,
    world_points,
    write_displacement,
    write_image,
)
from monai_icon.apps.validation import (
    IMAGE_SUFFIXES,
    TRANSFORM_SUFFIXES,
    check_count,
    check_device,
    check_finite,
    check_image_geometry,
    check_interval,
    check_label_values,
    check_output_path,
    check_outputs_spare_inputs,
    check_positive_number,
    check_side,
    check_sizes,
)
from monai_icon.losses.icon import ICONLoss
from monai_icon.metrics.dice import label_dice
from monai_icon.metrics.folds import count_folds
from monai_icon.engines.instance_optimisation import (
    IO_MODES,
    instance_optimise,
    residual_instance_optimise,
    restored_weights,
)
from monai_icon.engines.trainer import to_channels_last
from monai_icon.networks import pretrained
from monai_icon.networks.maps import Map
from monai_icon.networks.registration_net import register_one_way
from monai_icon.networks.spec import build_network, check_network_spec
from monai_icon.networks.weights import load_weights, read_checkpoint
from monai_icon.transforms.laterality import side_from_filename

__all__ = [
    "MODEL_FORMAT",
    "RegistrationModel",
    "save_registration_model",
    "load_registration_model",
    "restored_weights",
    "instance_optimise",
    "register_images",
    "register_files",
    "pair_id",
    "pair_outputs",
    "check_pairs",
    "register_pairs",
    "PairError",
    "score_labels",
]

MODEL_FORMAT = "monai-icon-model/1"
_SETTINGS = ("spatial_size", "axcodes", "percentiles", "window", "target_side", "resize_mode", "reverse_axes",
             "normalise_first", "similarity", "lmbda", "regularizer")
_OPTIONAL = ("axcodes", "percentiles", "window", "target_side")  # settings whose None means "skip this step"


@dataclass
class RegistrationModel:
    """A network and the way images reach it.

    Attributes:
        network: a :class:`~monai_icon.networks.RegistrationNet` (or any module returning ``(phi_AB, phi_BA)``).
        spatial_size: the network grid (e.g. ``(192, 192, 80)``).
        axcodes: orientation images are brought to before resizing (``None``: the file's array order).
        percentiles: intensity percentiles mapped to 0 and 1 (``None``: intensities unchanged).
        window: a fixed intensity range mapped to 0 and 1 instead (e.g. CT ``(-1000, 1000)``).
        target_side: knee side the model was trained on (images of the other side are mirrored when their side
            is given); ``None`` for non-knee models.
        resize_mode, reverse_axes, normalise_first: see :func:`~monai_icon.apps.physical.to_network_grid`
            (published ICON-family models: trilinear, ITK array order, normalised before resizing).
        similarity, lmbda, regularizer: the ICON loss of instance optimisation (``similarity``: a name of
            :func:`~monai_icon.losses.get_similarity`, or a loss module such as an LNCC with another window).
    """

    network: nn.Module
    spatial_size: tuple[int, ...]
    axcodes: str | None = None
    percentiles: tuple[float, float] | None = (1.0, 99.0)
    window: tuple[float, float] | None = None
    target_side: str | None = None
    resize_mode: str = "area"
    reverse_axes: bool = False
    normalise_first: bool = False
    similarity: str | _Loss = "mse"
    lmbda: float = 1.0
    regularizer: str = "icon"

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_size)


def save_registration_model(path: str | Path, network: nn.Module, network_def: dict[str, Any], **settings: Any) -> Path:
    """Write a self-describing model file (atomically): ``network_def`` (a declarative spec that builds the
    network, e.g. ``{"_target_": "monai_icon.networks.multistep_registration", "fine_steps": 1}``: allowed names and
    literal arguments only, see :mod:`monai_icon.networks.spec`), the weights and the :class:`RegistrationModel`
    settings (``spatial_size`` required).

    Raises:
        ValueError: a ``network_def`` that :func:`load_registration_model` would refuse, or unknown settings.
    """
    check_network_spec(network_def)  # write only what load_registration_model will accept
    unknown = set(settings) - set(_SETTINGS)
    if unknown or "spatial_size" not in settings:
        raise ValueError(f"settings must include spatial_size and may include {_SETTINGS}; got {sorted(settings)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"format": MODEL_FORMAT, "network_def": network_def, "state_dict": network.state_dict(),
               "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}}
    tmp = path.with_name(path.name + ".partial")
    torch.save(content, tmp)
    tmp.replace(path)
    return path


def _model(network: nn.Module, settings: dict[str, Any], source: str) -> RegistrationModel:
    if settings.get("spatial_size") is None:
        raise ValueError(f"{source} does not say the network's grid size (spatial_size); pass it explicitly.")
    kwargs = {k: v for k, v in settings.items() if k in _SETTINGS and (v is not None or k in _OPTIONAL)}
    kwargs["spatial_size"] = tuple(int(s) for s in kwargs["spatial_size"])
    for key in ("percentiles", "window"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return RegistrationModel(network=network, **kwargs)


def load_registration_model(
    path: str | Path, device: str | torch.device | None = None, spatial_size: Sequence[int] | None = None,
    kind: str | None = None, channels_last: bool | None = None, **overrides: Any,
) -> RegistrationModel:
    """Load a model file or bundle folder (see the module docstring) onto ``device`` in evaluation mode.

    Args:
        path: model file, bundle folder, or (with ``kind``) a published weights file.
        kind: a published model (:data:`monai_icon.networks.pretrained.PRETRAINED`: ``icon_oai``, ``gradicon_oai``,
            ``unigradicon``, ``multigradicon``); its network, grid and preprocessing come with it.
        channels_last: keep the convolution weights in PyTorch's channels-last memory format
            (``torch.channels_last_3d`` in 3D), which oneDNN's CPU convolutions run faster (``docs/benchmarks.md``).
            Default ``None``: on CPU for 3D models; the values do not depend on it (equal up to rounding).
        spatial_size, overrides: replace settings (e.g. ``window=(-1000, 1000)`` for CT with uniGradICON).

    Raises:
        FileNotFoundError: missing model file, bundle config or bundle weights.
        ValueError: unreadable/foreign files, a model file whose network_def is not plain data (names the entry),
            weights that do not match the network, or no grid size.
    """
    path = Path(path)
    device = check_device(device) or torch.device("cpu")
    check_sizes(spatial_size, "spatial_size", minimum=2)
    check_interval(overrides.get("window"), "window")
    check_interval(overrides.get("percentiles"), "percentiles", 0.0, 100.0)
    if "lmbda" in overrides:
        lmbda = overrides["lmbda"]
        if not (isinstance(lmbda, (int, float)) and 0 <= lmbda < float("inf")):
            raise ValueError(f"lmbda must be a finite number >= 0, got {lmbda!r}.")
    unknown = set(overrides) - set(_SETTINGS)
    if unknown:
        raise ValueError(f"unknown model settings {sorted(unknown)}; known: {_SETTINGS}.")
    network: nn.Module
    if kind is not None:
        network = pretrained.load(path, kind)
        settings, source = dict(pretrained.PRETRAINED[kind].settings), f"the {kind} recipe"
    elif path.is_dir():
        config_file = next((path / "configs" / f"inference.{ext}" for ext in ("json", "yaml", "yml")
                            if (path / "configs" / f"inference.{ext}").is_file()), None)
        if config_file is None:
            raise FileNotFoundError(f"{path} is a folder but not a bundle: no configs/inference.json or .yaml.")
        parser = ConfigParser()
        parser.read_config(str(config_file))
        parser["bundle_root"] = str(path)
        if "network_def" not in parser:
            raise ValueError(f"{config_file} has no network_def.")
        network = parser.get_parsed_content("network_def")
        weights = parser.get_parsed_content("model_file") if "model_file" in parser else path / "models" / "model.pt"
        load_weights(network, weights)
        settings = {k: parser.get_parsed_content(k) for k in _SETTINGS if k in parser}
        source = str(config_file)
    else:
        content = read_checkpoint(path, "model", "a model file or a bundle folder")
        if content.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} is not a monai-icon model file (save one with save_registration_model, or "
                             "pass a bundle folder); for plain weights build the network and use load_weights.")
        spec = cast(dict, content.get("network_def"))  # checked by build_network: a dict of allowed names/literals
        network = build_network(spec, f"{path}: network_def")  # data only: nothing runs
        load_weights(network, path)
        settings, source = dict(content["settings"]), str(path)
    if spatial_size is not None:
        settings["spatial_size"] = list(spatial_size)
    settings.update(overrides)
    model = _model(network.to(device).eval(), settings, source)
    if channels_last is None:
        channels_last = device.type == "cpu" and model.spatial_dims == 3
    if channels_last:
        to_channels_last(model.network)
    return model


@dataclass
class PhysicalRegistration:
    """The result of :func:`register_images`: ``phi`` in network coordinates and the two ``[0, 1]``-to-world
    matrices, enough to evaluate the world transform anywhere (:meth:`fixed_to_moving`)."""

    phi: Map
    fixed_unit_to_world: np.ndarray
    moving_unit_to_world: np.ndarray
    io_losses: list[float]
    seconds: float

    def fixed_to_moving(self, fixed_affine: np.ndarray, fixed_shape: Sequence[int]) -> torch.Tensor:
        """Moving world points (RAS mm) ``[3, *fixed_shape]`` of the voxel centres of a fixed grid."""
        return fixed_to_moving_world(
            self.phi, fixed_affine, fixed_shape, self.fixed_unit_to_world, self.moving_unit_to_world
        )


def register_images(
    model: RegistrationModel, fixed: MetaTensor, moving: MetaTensor, fixed_side: str | None = None,
    moving_side: str | None = None, io_steps: int = 0, io_lr: float = 2e-5, device: str | torch.device | None = None,
    io_mode: str = "network", io_size: Sequence[int] | None = None,
    fixed_mask: MetaTensor | None = None, moving_mask: MetaTensor | None = None,
    fixed_label: MetaTensor | None = None, moving_label: MetaTensor | None = None, label_weight: float = 0.0,
    io_levels: int = 1, io_field_size: Sequence[int] | None = None, io_fine_steps: int | None = None,
) -> PhysicalRegistration:
    """Register two channel-first MetaTensors (with affines) in physical space.

    Each image is brought to the model's grid by :func:`~monai_icon.apps.physical.to_network_grid`; with
    ``io_steps > 0`` instance optimisation refines the result on this pair: ``io_mode="network"`` fine-tunes the
    network's weights (restored afterwards), ``"residual"`` keeps the network and optimises free residual
    displacement fields on top of its maps
    (:func:`~monai_icon.engines.instance_optimisation.residual_instance_optimise`), on the network grid or, with
    ``io_size``, on a finer grid of the same field of view (e.g. twice the network grid). Masks (both or neither;
    nonzero = inside) zero each image outside its mask before the network (input masking) and restrict the
    similarity of instance optimisation to them (loss masking). With ``label_weight > 0`` and both label maps,
    instance optimisation adds the Dice term of the warped labels (label-supervised instance optimisation).
    ``io_levels > 1`` (residual mode) sums residual fields on that many grids, each half the previous one
    (coarse-to-fine in every step: smooth deformations need far fewer steps). ``io_field_size`` (residual mode):
    the grid of the residual fields and of the regulariser's points when it differs from the grid the images are
    compared on (default: ``io_size``, or the network grid), e.g. images compared at full resolution
    (``io_size``) while the fields stay on the network grid: finer similarity at a fraction of a finer field's cost.
    ``io_fine_steps``: with ``io_size``, only the last this many steps compare the images on ``io_size``, the
    others on the residual fields' grid (the network's inputs, or for a network that takes the finer images
    itself, those average-pooled; default: all steps on ``io_size``).
    """
    if io_levels != 1 and io_mode != "residual":
        raise ValueError(f"io_levels ({io_levels}) needs io_mode='residual'.")
    if (fixed_mask is None) != (moving_mask is None):
        raise ValueError("give both masks (fixed and moving) or neither.")
    if io_mode not in IO_MODES:
        raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}.")
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.ndim - 1 != model.spatial_dims:
            raise ValueError(f"the model registers {model.spatial_dims}D images but the {name} image is "
                             f"{image.ndim - 1}D (shape {tuple(image.shape[1:])}).")
    device = torch.device(device) if device is not None else next(model.network.parameters()).device
    start = time.perf_counter()
    grids = [to_network_grid(img, model.spatial_size, model.axcodes, model.percentiles, side, model.target_side,
                             model.window, model.resize_mode, model.reverse_axes, model.normalise_first)
             for img, side in ((fixed, fixed_side), (moving, moving_side))]
    fixed_net, moving_net = (g.as_tensor().unsqueeze(0).to(device) for g in grids)

    def nearest_pair(pair: tuple[MetaTensor | None, MetaTensor | None],
                     size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(moving, fixed)`` masks or label maps resampled (nearest) onto a grid, ``[1, 1, *size]`` each."""
        if pair[0] is None or pair[1] is None:
            return None
        out = [to_network_grid(m, size, model.axcodes, None, side, model.target_side, None, "nearest",
                               model.reverse_axes).as_tensor()[:1].unsqueeze(0).to(device)
               for m, side in ((pair[0], moving_side), (pair[1], fixed_side))]
        return out[0], out[1]

    def mask_on(size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        resampled = nearest_pair((moving_mask, fixed_mask), size)
        return None if resampled is None else ((resampled[0] > 0).float(), (resampled[1] > 0).float())

    def labels_on(size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        resampled = nearest_pair((moving_label, fixed_label), size) if label_weight > 0 else None
        return None if resampled is None else (resampled[0].round().long(), resampled[1].round().long())

    masks = mask_on(model.spatial_size)
    if masks is not None:
        moving_net, fixed_net = moving_net * masks[0], fixed_net * masks[1]
    if fixed_net.shape[1] != moving_net.shape[1]:
        raise ValueError(f"fixed and moving images have {fixed_net.shape[1]} and {moving_net.shape[1]} channels.")
    losses: list[float] = []
    network = model.network.eval()
    if label_weight > 0 and (fixed_label is None or moving_label is None):
        raise ValueError("label_weight > 0 needs both label maps (fixed and moving).")
    num_classes = None
    if label_weight > 0 and fixed_label is not None and moving_label is not None:
        num_classes = int(max(float(fixed_label.max()), float(moving_label.max()))) + 1
    for name, size in (("io_size", io_size), ("io_field_size", io_field_size)):
        if size is not None and (io_mode != "residual" or len(size) != model.spatial_dims):
            raise ValueError(f"{name} ({size}) needs io_mode='residual' and {model.spatial_dims} sizes.")
    loss = ICONLoss(model.similarity, model.lmbda, model.regularizer, spatial_dims=model.spatial_dims,
                    label_weight=label_weight if num_classes else 0.0, num_classes=num_classes,
                    regularizer_size=None if io_field_size is None else tuple(int(v) for v in io_field_size),
                    compute_folds=False)  # instance optimisation does not read the folds of its steps
    if io_steps > 0 and io_mode == "residual":
        loss_images = None
        if io_size is not None:
            fine = [to_network_grid(img, io_size, model.axcodes, model.percentiles, side, model.target_side,
                                    model.window, model.resize_mode, model.reverse_axes, model.normalise_first)
                    for img, side in ((fixed, fixed_side), (moving, moving_side))]
            loss_images = (fine[1].as_tensor().unsqueeze(0).to(device), fine[0].as_tensor().unsqueeze(0).to(device))
        io_masks = mask_on(io_size) if io_size is not None else masks
        if loss_images is not None and io_masks is not None:
            loss_images = (loss_images[0] * io_masks[0], loss_images[1] * io_masks[1])
        io_labels = labels_on(io_size) if io_size is not None else labels_on(model.spatial_size)
        phi, _, losses = residual_instance_optimise(network, moving_net, fixed_net, loss, io_steps, io_lr,
                                                    shape=tuple(io_field_size) if io_field_size else None,
                                                    loss_images=loss_images, masks=io_masks, labels=io_labels,
                                                    levels=io_levels, fine_steps=io_fine_steps)
    else:
        with restored_weights(network):
            if io_steps > 0:
                losses = instance_optimise(network, moving_net, fixed_net, loss, io_steps, io_lr, masks,
                                           labels_on(model.spatial_size))
            with torch.no_grad():  # the map holds the network's outputs: unaffected by restoring the weights
                phi = register_one_way(network, moving_net, fixed_net)
    return PhysicalRegistration(
        phi=phi,
        fixed_unit_to_world=unit_to_world(grids[0].affine, model.spatial_size),
        moving_unit_to_world=unit_to_world(grids[1].affine, model.spatial_size),
        io_losses=losses,
        seconds=time.perf_counter() - start,
    )


def register_files(
    fixed: str | Path,
    moving: str | Path,
    model: RegistrationModel | str | Path,
    warped: str | Path | None = None,
    ddf: str | Path | None = None,
    transform: str | Path | None = None,
    moving_label: str | Path | None = None,
    warped_label: str | Path | None = None,
    fixed_side: str | None = None,
    moving_side: str | None = None,
    io_steps: int = 0,
    io_lr: float = 2e-5,
    device: str | torch.device | None = None,
    memory_limit_bytes: int | None = None,
    io_mode: str = "network",
    io_size: Sequence[int] | None = None,
    fixed_mask: str | Path | None = None,
    moving_mask: str | Path | None = None,
    fixed_label: str | Path | None = None,
    label_weight: float = 0.0,
    io_levels: int = 1,
    io_field_size: Sequence[int] | None = None,
    io_fine_steps: int | None = None,
) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` (image files) and write the results on the fixed image's grid.

    Args:
        fixed, moving: image files (NIfTI, MHA, NRRD, ...), any spacing, orientation and size.
        model: a :class:`RegistrationModel` or a model file / bundle folder (:func:`load_registration_model`).
        warped: output file of the moving image resampled onto the fixed grid (linear).
        ddf: output displacement field (LPS mm, ITK/ANTs convention; see
            :func:`~monai_icon.apps.physical.write_displacement`).
        transform: output ITK displacement-field transform (``.h5``), applied by ITK/3D Slicer/ANTs.
        moving_label, warped_label: a moving label map and where to write it warped onto the fixed grid
            (one-hot linear interpolation + arg-max, integer labels kept).
        fixed_side, moving_side: knee sides, for models trained on one side (see :class:`RegistrationModel`);
            by default taken from ``LEFT``/``RIGHT`` in the file names when the model has a ``target_side``.
        io_steps, io_lr, io_mode, io_size, io_levels, io_field_size, io_fine_steps: instance optimisation (see
            :func:`register_images`).
        fixed_mask, moving_mask: optional mask files (both or neither) on the images' grids: input and loss masking
            (see :func:`register_images`).
        fixed_label, label_weight: label-supervised instance optimisation: the fixed label map and the weight of
            the Dice term on the warped ``moving_label`` (needs both label maps and ``io_steps > 0``).

    Returns:
        a summary: the files written, seconds, instance-optimisation losses, the folds of the final map (% of the
        cells of the network grid, or of the residual fields' grid, with a negative Jacobian determinant) and the mean
        displacement (mm, RAS).

    Raises:
        FileNotFoundError, ValueError: unreadable inputs or model, 2D/3D or channel mismatches, out-of-range
            arguments, sides other than LEFT/RIGHT, an unavailable device, outputs that cannot be written
            (checked before any computation), degenerate geometry, label maps that are not integer-valued.
        MemoryError: outputs on the fixed grid that would not fit in memory.
    """
    if (moving_label is None) != (warped_label is None):
        raise ValueError("give both moving_label and warped_label, or neither.")
    if not any((warped, ddf, transform, warped_label)):
        raise ValueError("nothing to write: give at least one of warped, ddf, transform, warped_label.")
    # every argument and output checked before any computation, so a long registration cannot fail at the end
    io_steps = check_count(io_steps, "io_steps")
    io_lr = check_positive_number(io_lr, "io_lr")
    if not (isinstance(label_weight, (int, float)) and 0 <= label_weight < float("inf")):
        raise ValueError(f"label_weight must be a finite number >= 0, got {label_weight!r}.")
    if label_weight > 0 and (fixed_label is None or moving_label is None or io_steps == 0):
        raise ValueError("label_weight > 0 needs fixed_label, moving_label and io_steps > 0 (it weights the label "
                         "term of instance optimisation).")
    if io_mode not in IO_MODES:
        raise ValueError(f"io_mode must be one of {IO_MODES}, got {io_mode!r}.")
    check_sizes(io_size, "io_size", minimum=2)
    check_sizes(io_field_size, "io_field_size", minimum=2)
    io_levels = check_count(io_levels, "io_levels", minimum=1)
    if io_levels > 1 and io_mode != "residual":
        raise ValueError(f"io_levels > 1 needs io_mode='residual' (coarse-to-fine residual fields), got io_levels "
                         f"{io_levels} with io_mode={io_mode!r}.")
    fixed_side, moving_side = check_side(fixed_side, "fixed_side"), check_side(moving_side, "moving_side")
    device = check_device(device)
    for path, name, suffixes in ((warped, "warped", IMAGE_SUFFIXES), (warped_label, "warped_label", IMAGE_SUFFIXES),
                                 (ddf, "ddf", IMAGE_SUFFIXES), (transform, "transform", TRANSFORM_SUFFIXES)):
        check_output_path(path, name, suffixes)
    check_outputs_spare_inputs(
        {"warped": warped, "warped_label": warped_label, "ddf": ddf, "transform": transform},
        {"fixed image": fixed, "moving image": moving, "moving label": moving_label, "fixed label": fixed_label,
         "fixed mask": fixed_mask, "moving mask": moving_mask,
         "model file": model if isinstance(model, (str, Path)) and Path(model).is_file() else None},
    )
    if not isinstance(model, RegistrationModel):
        model = load_registration_model(model, device)
    fixed_image, moving_image = load_image(fixed, "fixed image"), load_image(moving, "moving image")
    label = load_image(moving_label, "moving label") if moving_label is not None else None
    if (fixed_mask is None) != (moving_mask is None):
        raise ValueError("give both masks (fixed_mask and moving_mask) or neither.")
    masks = [load_image(m, f"{role} mask") if m is not None else None
             for m, role in ((fixed_mask, "fixed"), (moving_mask, "moving"))]
    for mask, image, role in ((masks[0], fixed_image, "fixed"), (masks[1], moving_image, "moving")):
        if mask is not None and tuple(mask.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(f"the {role} mask's grid {tuple(mask.shape[1:])} differs from the {role} image's "
                             f"{tuple(image.shape[1:])}.")
    for image, name in ((fixed_image, "the fixed image"), (moving_image, "the moving image")):
        check_image_geometry(np.asarray(image.affine), tuple(image.shape[1:]), name, model.spatial_dims)
    if label is not None:
        check_label_values(label.as_tensor(), f"the moving label {moving_label}")
    fixed_labels = load_image(fixed_label, "fixed label") if fixed_label is not None else None
    if fixed_labels is not None:
        check_label_values(fixed_labels.as_tensor(), f"the fixed label {fixed_label}")
        if tuple(fixed_labels.shape[1:]) != tuple(fixed_image.shape[1:]):
            raise ValueError(f"the fixed label's grid {tuple(fixed_labels.shape[1:])} differs from the fixed image's "
                             f"{tuple(fixed_image.shape[1:])}.")
    if fixed_image.ndim != moving_image.ndim:
        raise ValueError(
            f"fixed and moving images differ in dimension: {fixed_image.ndim - 1}D vs {moving_image.ndim - 1}D."
        )
    if label is not None and tuple(label.shape[1:]) != tuple(moving_image.shape[1:]):
        raise ValueError(f"the moving label's grid {tuple(label.shape[1:])} differs from the moving image's "
                         f"{tuple(moving_image.shape[1:])}.")
    fixed_shape = tuple(fixed_image.shape[1:])
    fixed_affine = np.asarray(fixed_image.affine, dtype=np.float64)
    num_classes = len(torch.unique(label.as_tensor())) + 1 if label is not None else 0
    check_memory(int(np.prod(fixed_shape)), 3 + moving_image.shape[0] + num_classes, "the outputs on the fixed grid",
                 memory_limit_bytes)

    if model.target_side is not None:  # one-sided knee model: sides default to LEFT/RIGHT in the file names
        fixed_side = fixed_side or side_from_filename(fixed)
        moving_side = moving_side or side_from_filename(moving)
    result = register_images(model, fixed_image, moving_image, fixed_side, moving_side, io_steps, io_lr, device,
                             io_mode, io_size, masks[0], masks[1], fixed_labels, label, float(label_weight),
                             io_levels, io_field_size, io_fine_steps)
    points = result.fixed_to_moving(fixed_affine, fixed_shape)
    try:
        check_finite(points, "the registration's result")
    except ValueError as err:
        raise ValueError(f"{err} Nothing was written: check the model's weights, the images' intensities and the "
                         "instance-optimisation settings (a learning rate too large diverges).") from None
    moving_affine = np.asarray(moving_image.affine, dtype=np.float64)
    written = {}
    if warped is not None:
        values = sample_world(moving_image.as_tensor(), moving_affine, points)
        written["warped"] = str(
            write_image(
                values[0].numpy() if values.shape[0] == 1 else values.movedim(0, -1).numpy(), fixed_affine, warped,
                "warped image",
            )
        )
    if label is not None and warped_label is not None:  # both or neither (checked above)
        warped_labels = sample_labels(label.as_tensor()[:1], moving_affine, points, memory_limit_bytes)
        written["warped_label"] = str(write_image(warped_labels.to(label_dtype(warped_labels)).numpy(), fixed_affine,
                                                  warped_label, "warped label map"))
    displacement = points - world_points(fixed_affine, fixed_shape)
    if ddf is not None or transform is not None:
        write_displacement(displacement, fixed_affine, ddf, transform)
        written.update({k: str(v) for k, v in (("ddf", ddf), ("transform", transform)) if v is not None})
    with torch.no_grad():  # folds of the final map on the grid it was computed on (the reference's stencil)
        folds = count_folds(result.phi.grid(tuple(io_field_size or io_size or model.spatial_size)), percentage=True)
    return {
        "written": written,
        "seconds": result.seconds,
        "io_losses": result.io_losses,
        "folds_percent": float(folds.mean()),
        "mean_displacement_mm": displacement.reshape(displacement.shape[0], -1).mean(1).tolist(),
    }


RESUME_FOLDER = ".register_pairs"  # per-pair summaries of register_pairs(resume=True), inside the output folder
_PAIR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def pair_id(pair: dict[str, Any], index: int) -> str:
    """A pair's ``pair_id`` (default ``pair<index>``, e.g. ``pair003``), checked to be a safe file-name stem.

    Raises:
        ValueError: not a string or integer, or not 1-100 letters, digits, ``.``, ``_`` or ``-`` starting with a
            letter or digit (no folders, no hidden files, no control characters).
    """
    name = pair.get("pair_id", f"pair{index:03d}")
    if isinstance(name, bool) or not isinstance(name, (str, int)) or not _PAIR_ID.fullmatch(str(name)):
        shown = repr(name)[:60] + ("..." if len(repr(name)) > 60 else "")
        raise ValueError(f"pair {index}: pair_id {shown} must be a plain file name stem: 1-100 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit (it names the pair's output files).")
    return str(name)


def pair_outputs(pair: dict[str, Any], index: int, output_dir: str | Path) -> dict[str, Path | None]:
    """The output files of one pair of a pair datalist: ``<pair_id>_warped.nii.gz``, ``_ddf.nii.gz`` (LPS mm),
    ``_phi.h5`` (ITK transform) and, when the pair has a ``moving_label``, ``_warped_label.nii.gz``
    (``pair_id`` defaults to ``pair<index>``; see :func:`pair_id`)."""
    name = pair_id(pair, index)
    base = Path(output_dir)
    return {
        "warped": base / f"{name}_warped.nii.gz",
        "ddf": base / f"{name}_ddf.nii.gz",
        "transform": base / f"{name}_phi.h5",
        "warped_label": base / f"{name}_warped_label.nii.gz" if pair.get("moving_label") else None,
    }


def check_pairs(pairs: Sequence[dict[str, Any]], output_dir: str | Path,
                extra_outputs: dict[str, str | Path | None] | None = None) -> list[dict[str, Path | None]]:
    """Check a whole pair datalist before any registration: unique, safe ``pair_id`` s, an output folder that is a
    folder, and no output (of any pair, or ``extra_outputs`` such as the summary) that is an input of any pair.

    Returns:
        each pair's :func:`pair_outputs`.

    Raises:
        ValueError: the first problem, naming the pair.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"the output folder {str(output_dir)!r} is a file.")
    ids: dict[str, int] = {}
    outputs: dict[str, str | Path | None] = dict(extra_outputs or {})
    inputs: dict[str, str | Path | None] = {}
    files = []
    for i, pair in enumerate(pairs):
        name = pair_id(pair, i)
        if name in ids:
            raise ValueError(f"pairs {ids[name]} and {i} have the same pair_id {name!r}: their outputs would "
                             "overwrite each other.")
        ids[name] = i
        pair_files = pair_outputs(pair, i, output_dir)
        files.append(pair_files)
        outputs.update({f"pair {name}'s {role}": path for role, path in pair_files.items()})
        inputs.update({f"pair {name}'s {key}": pair.get(key) for key in ("fixed_image", "moving_image",
                                                                         "moving_label", "fixed_label")})
    check_outputs_spare_inputs(outputs, inputs)
    return files


def register_pairs(
    pairs: Sequence[dict[str, Any]],
    model: RegistrationModel | str | Path,
    output_dir: str | Path,
    io_steps: int = 0,
    io_lr: float = 2e-5,
    device: str | torch.device | None = None,
    io_mode: str = "network",
    io_size: Sequence[int] | None = None,
    io_levels: int = 1,
    io_field_size: Sequence[int] | None = None,
    io_fine_steps: int | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Register every pair of a pair datalist (:func:`~monai_icon.data.load_pair_datalist`) in physical space with
    :func:`register_files` (the ``io_*`` arguments are its), writing :func:`pair_outputs` into ``output_dir``.
    Prints one line per pair. The whole list is checked first (:func:`check_pairs`).

    Pairs with both ``moving_label`` and ``fixed_label`` are scored: Dice per label
    (:func:`~monai_icon.metrics.label_dice`) of the warped moving labels against the fixed labels on the fixed
    image's own grid, and of the moving labels placed on that grid unregistered (identity in world space).

    Each pair's random draws (the random points of instance optimisation) are seeded from its ``pair_id``, so its
    result does not depend on the order of the pairs or on the process that registers it (``torchrun``). With
    ``resume``, each finished pair's summary is also kept in ``output_dir/.register_pairs/<pair_id>.json``, and
    a pair whose summary and outputs are there from an earlier run (stopped, failed or killed) is not registered
    again.

    Returns:
        the summaries of :func:`register_files`, one per pair (with ``pair_id`` and, for scored pairs, ``dice``,
        ``dice_unregistered`` and their means ``mean_dice``, ``mean_dice_unregistered``).

    Raises:
        PairError: a pair failed (the message names it and its files; pairs before it are written).
    """
    all_outputs = check_pairs(pairs, output_dir, {"summary": Path(output_dir) / "summary.json"})
    if not isinstance(model, RegistrationModel):
        model = load_registration_model(model, device)
    summaries = []
    for i, (pair, outputs) in enumerate(zip(pairs, all_outputs)):
        name = pair_id(pair, i)
        record = Path(output_dir) / RESUME_FOLDER / f"{name}.json"
        if resume and record.is_file() and all(p is None or p.is_file() for p in outputs.values()):
            summaries.append(json.loads(record.read_text()))
            print(f"{name}: done by an earlier run", flush=True)
            continue
        try:
            with _seeded(name):
                summary = register_files(pair["fixed_image"], pair["moving_image"], model, warped=outputs["warped"],
                                         ddf=outputs["ddf"], transform=outputs["transform"],
                                         moving_label=pair.get("moving_label"), warped_label=outputs["warped_label"],
                                         io_steps=io_steps, io_lr=io_lr, device=device, io_mode=io_mode,
                                         io_size=io_size, io_levels=io_levels, io_field_size=io_field_size,
                                         io_fine_steps=io_fine_steps)
            summary["pair_id"] = name
            line = f"{name}: {summary['seconds']:.2f} s, folds {summary['folds_percent']:.3f} %"
            if pair.get("fixed_label") and outputs["warped_label"] is not None:
                summary.update(score_labels(pair["fixed_label"], pair["moving_label"], outputs["warped_label"]))
                line += f", label Dice {summary['mean_dice_unregistered']:.3f} -> {summary['mean_dice']:.3f}"
        except Exception as err:
            raise PairError(f"pair {name} (pair {i + 1} of {len(pairs)}; fixed {pair['fixed_image']}, moving "
                            f"{pair['moving_image']}): {err}") from err
        if resume:
            write_text(record, json.dumps(summary, default=str), "pair summary")
        print(line, flush=True)
        summaries.append(summary)
    return summaries


@contextmanager
def _seeded(name: str) -> Iterator[None]:
    """PyTorch's random draws (the random points of instance optimisation) seeded from the pair's id, the global
    generators restored afterwards: a pair's result does not depend on the order or the process it runs in."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(name.encode()))
        yield


class PairError(ValueError):
    """A pair of :func:`register_pairs` failed; the message names the pair and its files."""


def score_labels(fixed_label: str | Path, moving_label: str | Path, warped_label: str | Path) -> dict[str, Any]:
    """Dice per label (the fixed label map's nonzero labels) of the warped labels and of the unregistered moving
    labels (resampled, nearest, onto the fixed grid by the identity in world space), both on the fixed grid."""
    fixed = load_image(fixed_label, "fixed label")
    fixed_affine = np.asarray(fixed.affine, dtype=np.float64)
    target = fixed.as_tensor()[0].round().long()
    warped = load_image(warped_label, "warped label").as_tensor()[0].round().long()
    moving = load_image(moving_label, "moving label")
    points = world_points(fixed_affine, tuple(target.shape))
    before = sample_world(moving.as_tensor()[:1], np.asarray(moving.affine, dtype=np.float64), points,
                          mode="nearest")[0].round().long()
    labels = [int(v) for v in torch.unique(target) if v != 0]
    after_dice, before_dice = label_dice(warped, target, labels), label_dice(before, target, labels)

    def mean(values: dict[int, float]) -> float:
        finite = [v for v in values.values() if v == v]
        return float(np.mean(finite)) if finite else float("nan")

    return {"dice": after_dice, "dice_unregistered": before_dice, "mean_dice": mean(after_dice),
            "mean_dice_unregistered": mean(before_dice)}
