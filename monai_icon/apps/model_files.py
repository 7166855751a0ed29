# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Model files: a network plus how images reach it, saved as data and loaded safely.

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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from torch.nn.modules.loss import _Loss

from monai_icon.apps.validation import check_device, check_interval, check_sizes
from monai_icon.engines.trainer import to_channels_last
from monai_icon.networks import pretrained
from monai_icon.networks.spec import build_network, check_network_spec
from monai_icon.networks.weights import apply_checkpoint, load_weights, read_checkpoint
from monai_icon.transforms.network_grid import NetworkGrid

__all__ = ["MODEL_FORMAT", "RegistrationModel", "save_registration_model", "load_registration_model"]

MODEL_FORMAT = "monai-icon-model/1"
_SETTINGS = ("spatial_size", "axcodes", "percentiles", "window", "target_side", "resize_mode", "reverse_axes",
             "normalise_first", "similarity", "lmbda", "regularizer", "isotropic")
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
        isotropic: register each pair on a grid shaped like its fixed image's field of view with as many voxels
            as ``spatial_size`` (:attr:`NetworkGrid.isotropic <monai_icon.transforms.NetworkGrid>`).
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
    isotropic: bool = False

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_size)

    @property
    def grid(self) -> NetworkGrid:
        """How images reach the network, as one value (:class:`~monai_icon.transforms.NetworkGrid`)."""
        return NetworkGrid(tuple(self.spatial_size), self.axcodes, self.percentiles, self.target_side, self.window,
                           self.resize_mode, self.reverse_axes, self.normalise_first, bool(self.isotropic))


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
        apply_checkpoint(network, content, path)  # the file read once
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
