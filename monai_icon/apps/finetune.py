# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Fine-tuning published ICON-family weights on one's own images (``configs/pretrained/finetune.yaml``).

Training images must reach the network exactly as ``monai-icon register`` will bring them at inference:
:class:`~monai_icon.transforms.ToNetworkGridd` applies :func:`~monai_icon.transforms.to_network_grid` with the
published model's settings (:func:`pretrained_settings`) inside a MONAI ``Compose``, and :func:`export_finetuned`
writes a self-describing model file whose ``network_def`` rebuilds the published architecture
(``monai_icon.networks.pretrained.build``) with the fine-tuned weights and those same settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from monai_icon.apps.model_files import save_registration_model
from monai_icon.apps.validation import check_interval, check_sizes
from monai_icon.networks import pretrained
from monai_icon.transforms.network_grid import ToNetworkGridd

__all__ = ["pretrained_settings", "ToNetworkGridd", "export_finetuned"]  # ToNetworkGridd lives in transforms


def pretrained_settings(kind: str, spatial_size: Sequence[int] | None = None,
                        window: Sequence[float] | None = None) -> dict[str, Any]:
    """The :class:`~monai_icon.apps.RegistrationModel` settings of a published ``kind`` (its grid, intensity
    normalisation and instance-optimisation loss), optionally with another grid (e.g. smaller for a test) or a
    fixed intensity window (CT: ``(-1000, 1000)``; replaces the percentiles).

    Raises:
        ValueError: an unknown kind, a grid of the wrong dimension or size, an empty or reversed window.
    """
    settings = dict(pretrained.PRETRAINED[kind].settings) if kind in pretrained.PRETRAINED else None
    if settings is None:
        raise ValueError(f"unknown pretrained model kind {kind!r}; choose one of {sorted(pretrained.PRETRAINED)}.")
    if spatial_size is not None:
        check_sizes(spatial_size, "spatial_size", minimum=2)
        if len(spatial_size) != len(settings["spatial_size"]):
            raise ValueError(f"spatial_size must have {len(settings['spatial_size'])} values, got {spatial_size}.")
        settings["spatial_size"] = tuple(int(s) for s in spatial_size)
    if window is not None:
        check_interval(window, "window")
        settings["window"], settings["percentiles"] = (float(window[0]), float(window[1])), None
    return settings


def export_finetuned(path: str | Path, network: nn.Module, kind: str, settings: Mapping[str, Any]) -> Path:
    """Write a model file for ``monai-icon register --model``: the published ``kind``'s architecture
    (``network_def = {"_target_": "monai_icon.networks.pretrained.build", "kind": kind}``, data only), the
    fine-tuned weights and ``settings`` (:func:`pretrained_settings`). Written atomically."""
    if kind not in pretrained.PRETRAINED:
        raise ValueError(f"unknown pretrained model kind {kind!r}; choose one of {sorted(pretrained.PRETRAINED)}.")
    spec = {"_target_": "monai_icon.networks.pretrained.build", "kind": kind}
    return save_registration_model(path, network, spec, **dict(settings))
