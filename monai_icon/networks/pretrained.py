# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Published ICON-family weights in this project's blocks: ICON (OAI knees), GradICON (OAI knees), uniGradICON
and multiGradICON.

The networks are built from :class:`~monai_icon.networks.TwoStep`, :class:`~monai_icon.networks.Downsample`,
:class:`~monai_icon.networks.DisplacementField` and :class:`~monai_icon.networks.nets.TallUNet`; a published
weights file (a state dict with the reference's names, ``regis_net.netPhi...``) maps onto them name by name
(:func:`reference_key_map`), checked strictly against the committed list of the reference's names and shapes
(``resources/*_keys.json``). Nothing is downloaded: users bring the weights file.

=================  ==========================================================  =====================
kind               structure (``∘`` = composed after)                          network grid (ITK
                                                                               array order z, y, x)
=================  ==========================================================  =====================
``icon_oai``       ``Down2(U_chunky ∘ U)`` then ``U`` then ``U``               80 x 192 x 192
``gradicon_oai``   ``Down2(Down2(U) ∘ U)`` then ``U`` then ``U`` (``tallUNet2``)  80 x 192 x 192
``unigradicon``    same as ``gradicon_oai``                                    175 x 175 x 175
``multigradicon``  same as ``gradicon_oai``                                    175 x 175 x 175
=================  ==========================================================  =====================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from monai_icon.networks.blocks import DisplacementField, Downsample, RegistrationModule, TwoStep
from monai_icon.networks.nets.tall_unet import TallUNet
from monai_icon.networks.registration_net import RegistrationNet
from monai_icon.networks.weights import check_finite_weights, read_checkpoint

__all__ = ["PRETRAINED", "PretrainedSpec", "build", "reference_key_map", "reference_shapes", "to_reference_state_dict",
           "from_reference_state_dict", "load"]


def _step(chunky: bool = False) -> DisplacementField:
    return DisplacementField(TallUNet(3, chunky_middle=chunky))


def _icon_oai() -> RegistrationNet:
    low = TwoStep(_step(chunky=True), _step())
    return RegistrationNet(TwoStep(TwoStep(Downsample(low, 2), _step()), _step()))


def _gradicon() -> RegistrationNet:
    inner: RegistrationModule = _step()
    for _ in range(2):
        inner = TwoStep(Downsample(inner, 2), _step())
    return RegistrationNet(TwoStep(inner, _step()))


@dataclass(frozen=True)
class PretrainedSpec:
    """How a published model is built and fed (facts of the published recipes).

    ``settings`` are :class:`monai_icon.apps.RegistrationModel` settings: the network grid in the reference's
    array order (``reverse_axes``: ITK's z, y, x), trilinear resizing, intensity normalisation and the
    instance-optimisation loss of the published recipe.
    """

    builder: Callable[[], RegistrationNet]
    keys_file: str
    settings: dict[str, Any] = field(default_factory=dict)


_KNEE = {"spatial_size": (80, 192, 192), "reverse_axes": True, "resize_mode": "trilinear", "axcodes": None,
         "percentiles": (0.0, 99.0), "target_side": None}
PRETRAINED: dict[str, PretrainedSpec] = {
    "icon_oai": PretrainedSpec(
        _icon_oai, "icon_oai_keys.json", {**_KNEE, "similarity": "mse", "regularizer": "icon", "lmbda": 3600.0}
    ),
    "gradicon_oai": PretrainedSpec(
        _gradicon, "gradicon_keys.json", {**_KNEE, "similarity": "lncc", "regularizer": "gradicon", "lmbda": 1.5}
    ),
    "unigradicon": PretrainedSpec(
        _gradicon,
        "gradicon_keys.json",
        {**_KNEE, "spatial_size": (175, 175, 175), "similarity": "lncc", "regularizer": "gradicon", "lmbda": 1.5},
    ),
    "multigradicon": PretrainedSpec(
        _gradicon,
        "gradicon_keys.json",
        {**_KNEE, "spatial_size": (175, 175, 175), "similarity": "lncc", "regularizer": "gradicon", "lmbda": 1.5},
    ),
}


def _spec(kind: str) -> PretrainedSpec:
    if kind not in PRETRAINED:
        raise ValueError(f"unknown pretrained model kind {kind!r}; choose one of {sorted(PRETRAINED)}.")
    return PRETRAINED[kind]


def build(kind: str) -> RegistrationNet:
    """A randomly initialised network of a published ``kind`` (zero-initialised last layers: the identity map)."""
    return _spec(kind).builder()


def reference_shapes(kind: str) -> dict[str, list[int]]:
    """The reference's parameter/buffer names and shapes for ``kind`` (the committed list)."""
    root = resources.files("monai_icon.networks.resources")
    return json.loads(root.joinpath(_spec(kind).keys_file).read_text())


def _reference_names(module: nn.Module, ours: str, theirs: str, out: dict[str, str]) -> None:
    """Walk blocks in parallel with the reference's attribute names."""
    children: dict[str, str]
    if isinstance(module, RegistrationNet):
        children = {"block": "regis_net"}
    elif isinstance(module, TwoStep):
        children = {"first": "netPhi", "second": "netPsi"}
    elif isinstance(module, Downsample):
        children = {"block": "net"}
    elif isinstance(module, DisplacementField):
        children = {"net": "net"}
    elif isinstance(module, TallUNet):
        for name in module.state_dict():
            out[ours + name] = theirs + name
        return
    else:
        raise TypeError(f"{type(module).__name__} has no counterpart in the published models.")
    for child, ref in children.items():
        _reference_names(getattr(module, child), f"{ours}{child}.", f"{theirs}{ref}.", out)


def reference_key_map(network: RegistrationNet) -> dict[str, str]:
    """``{our state-dict key: the reference's key}`` for a network built by :func:`build`."""
    out: dict[str, str] = {}
    _reference_names(network, "", "", out)
    return out


def to_reference_state_dict(network: RegistrationNet) -> dict[str, torch.Tensor]:
    """``network``'s state dict under the reference's names (what the published files hold)."""
    names = reference_key_map(network)
    return {names[k]: v for k, v in network.state_dict().items()}


def from_reference_state_dict(
    network: RegistrationNet, state: Mapping[str, torch.Tensor], kind: str
) -> RegistrationNet:
    """Load a reference-named state dict into ``network`` strictly: every key of the committed list must be
    present with its shape, and nothing else (a ``regis_net.`` prefix is optional).

    Raises:
        ValueError: missing, unexpected or mis-shaped entries (the first ones are named).
    """
    expected = reference_shapes(kind)
    state = {k if k.startswith("regis_net.") else f"regis_net.{k}": v for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: file {list(state[k].shape)} vs {expected[k]}" for k in sorted(set(expected) & set(state))
             if list(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"these weights are not a {kind!r} model: {len(missing)} missing {missing[:4]}, "
                         f"{len(unexpected)} unexpected {unexpected[:4]}, {len(wrong)} mis-shaped {wrong[:4]}.")
    ours = {mine: state[theirs] for mine, theirs in reference_key_map(network).items()}
    network.load_state_dict(ours, strict=True)
    return network


def load(path: str | Path, kind: str, device: str | torch.device = "cpu") -> RegistrationNet:
    """Build a published model of ``kind`` and load a local weights file into it (strictly; see
    :func:`from_reference_state_dict`); returns it in evaluation mode on ``device``.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown kind, unreadable file or weights of another model.
    """
    spec = _spec(kind)
    state = read_checkpoint(path, hint="download the published file yourself")
    check_finite_weights(state, path)
    network = from_reference_state_dict(spec.builder(), state, kind)
    return network.to(device).eval()
