# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The recommended test-time settings of ``monai-icon register`` as named presets.

- :data:`RECOMMENDED_ENSEMBLE` (``--ensemble``): the network's moving-to-fixed map averaged with the inverse of
  its fixed-to-moving map, on the images and on the images mirrored along axis 0 (left-right for RAS models of
  heads), applied twice (each pass on the moving image warped by the maps so far).
- :data:`RECOMMENDED_REFINEMENT` (``--refine``): per-pair instance optimisation of residual displacement fields on
  top of the network's maps (LNCC and GradICON): fields on the model's network grid (half the image grid of the
  model file), four levels coarse to fine, the images compared on that grid first and on the model's full image
  grid in the last ``io_fine_steps`` steps.

Both were chosen on validation pairs (docs/generalisation.md); any explicitly given flag overrides its value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai_icon.engines.instance_optimisation import Refinement

__all__ = ["RECOMMENDED_ENSEMBLE", "RECOMMENDED_REFINEMENT", "refinement_arguments", "recommended_refinement"]

RECOMMENDED_ENSEMBLE: dict[str, Any] = {"symmetric": True, "flip_axes": [0], "passes": 2}

RECOMMENDED_REFINEMENT: dict[str, Any] = {
    "io_mode": "residual",
    "io_steps": 36,
    "io_fine_steps": 18,
    "io_levels": 4,
    "io_lr": 3e-3,
    "similarity": "lncc",
    "lncc_kernel": 5,
    "regularizer": "gradicon",
    "lmbda": 4.0,
}


def refinement_arguments(spatial_size: Sequence[int], **overrides: Any) -> dict[str, Any]:
    """The refinement's settings for a model whose image grid is ``spatial_size``: :data:`RECOMMENDED_REFINEMENT`
    plus ``io_size`` (that grid) and ``io_field_size`` (half of it, at least 2 per axis), with ``overrides``
    (values that are ``None`` are ignored) taking precedence.

    Raises:
        ValueError: an unknown setting name in ``overrides``.
    """
    size = [int(s) for s in spatial_size]
    settings = dict(RECOMMENDED_REFINEMENT, io_size=size, io_field_size=[max(2, s // 2) for s in size])
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"unknown refinement settings {unknown}; known: {sorted(settings)}.")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def recommended_refinement(spatial_size: Sequence[int]) -> Refinement:
    """The instance-optimisation part of :func:`refinement_arguments` as one value for
    :func:`monai_icon.apps.register_files` (``refinement=``). The refinement's loss belongs to the model; set it as
    ``--refine`` does: ``model.similarity = monai_icon.losses.get_similarity("lncc", model.spatial_dims,
    kernel_size=5)``, ``model.regularizer = "gradicon"``, ``model.lmbda = 4.0``."""
    s = refinement_arguments(spatial_size)
    return Refinement(steps=s["io_steps"], lr=s["io_lr"], mode=s["io_mode"], size=tuple(s["io_size"]),
                      levels=s["io_levels"], field_size=tuple(s["io_field_size"]), fine_steps=s["io_fine_steps"])
