# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Exporting a network the 3D bundle trained as a self-describing model file (the bundle layer, above ``apps``).

The bundle's ``save_model`` is a :class:`MultistepModelExport` built from the config's values; its
``export_model`` step calls it with a path and the trained network once training has finished.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.handlers import EMAHandler
from torch import nn

from monai_icon.apps import save_registration_model
from monai_icon.config import as_bool

__all__ = ["MultistepModelExport"]


class MultistepModelExport:
    """Write a :func:`~monai_icon.networks.multistep_registration` network as a model file for ``monai-icon register
    --model`` (:func:`~monai_icon.apps.save_registration_model`): its spec (``coarse_factor``, ``fine_steps`` and
    the ``architecture`` values), the weights, the preprocessing (``spatial_size``, ``axcodes``, ``target_side``)
    and the method (``similarity``, ``regularizer``, and the current lambda of ``loss`` when the file is written).
    """

    def __init__(self, architecture: Mapping[str, Any], coarse_factor: int, fine_steps: int,
                 spatial_size: Sequence[int], axcodes: str | None, target_side: str | None, similarity: str,
                 regularizer: str, loss: Any) -> None:
        resample = as_bool(architecture.get("resample_coarse", False), "resample_coarse")
        self.network_def = {"_target_": "monai_icon.networks.multistep_registration", "coarse_factor": coarse_factor,
                            "fine_steps": fine_steps, **dict(architecture, resample_coarse=resample)}
        self.settings = {"spatial_size": spatial_size, "axcodes": axcodes, "target_side": target_side,
                         "similarity": similarity, "regularizer": regularizer}
        self.loss = loss

    def __call__(self, path: str | Path, network: nn.Module | EMAHandler | None) -> Path | None:
        """Write ``network`` (a module, or the averaged model of an ``EMAHandler``) to ``path``; nothing when it is
        ``None`` (e.g. no moving average was kept). Returns the path written, or ``None``."""
        if network is None:
            return None
        module = network.ema_model if isinstance(network, EMAHandler) else network
        return save_registration_model(path, module, dict(self.network_def), **self.settings,
                                       lmbda=float(self.loss.lmbda))
