# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The recommended test-time settings of ``monai-icon register`` as named presets.

- :data:`RECOMMENDED_ENSEMBLE` (``--ensemble``): the network's moving-to-fixed map averaged with the inverse of
  its fixed-to-moving map, on the images and on the images mirrored along axis 0 (left-right for RAS models of
  heads), applied twice (each pass on the moving image warped by the maps so far).
- :data:`RECOMMENDED_REFINEMENT` (``--refine``): per-pair refinement of the network's moving-to-fixed map by one
  residual displacement field added to it (``io_mode="one-way"``,
  :func:`~monai_icon.engines.instance_optimisation.refine_one_way`): LNCC (window 3) plus a diffusion regulariser
  (weight 2), fields on 4 levels, 28 Adam steps at 7e-3; the images compared on a grid of about 614,400 voxels shaped
  like the fixed image's field of view in the last 4 steps and on half of it before.
- :data:`SYMMETRIC_REFINEMENT` (``--refine symmetric``): the slower refinement of both maps with the
  inverse-consistency loss (GradICON), ``io_mode="residual"``: for when inverse consistency of the refined maps
  matters more than time, and for images like the model's training data (on the T1-head test pairs it is 0.02
  Dice better than ``--refine``, at about 9 times its time).

The presets were chosen on validation pairs (docs/generalisation.md); any explicitly given flag overrides its value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai_icon.engines.instance_optimisation import Refinement

__all__ = ["RECOMMENDED_ENSEMBLE", "RECOMMENDED_REFINEMENT", "SYMMETRIC_REFINEMENT", "REFINEMENT_PRESETS",
           "refinement_arguments", "recommended_refinement"]

RECOMMENDED_ENSEMBLE: dict[str, Any] = {"symmetric": True, "flip_axes": [0], "passes": 2}

RECOMMENDED_REFINEMENT: dict[str, Any] = {
    "io_mode": "one-way",
    "io_steps": 28,
    "io_fine_steps": 4,
    "io_levels": 4,
    "io_lr": 7e-3,
    "io_smoothness": 2.0,
    "io_voxels": 614_400,
    "similarity": "lncc",
    "lncc_kernel": 3,
}

SYMMETRIC_REFINEMENT: dict[str, Any] = {
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

#: The refinements of ``--refine NAME`` (``--refine`` alone: ``one-way``).
REFINEMENT_PRESETS: dict[str, dict[str, Any]] = {"one-way": RECOMMENDED_REFINEMENT, "symmetric": SYMMETRIC_REFINEMENT}


def refinement_arguments(spatial_size: Sequence[int], preset: dict[str, Any] | None = None,
                         **overrides: Any) -> dict[str, Any]:
    """The refinement's settings for a model whose image grid is ``spatial_size``: ``preset`` (default
    :data:`RECOMMENDED_REFINEMENT`) with ``overrides`` (values that are ``None`` are ignored) taking precedence. A
    preset without ``io_voxels`` (e.g. :data:`SYMMETRIC_REFINEMENT`) compares the images on ``spatial_size``
    (``io_size``) with the fields on half of it (``io_field_size``).

    Raises:
        ValueError: an unknown setting name in ``overrides``.
    """
    settings = dict(RECOMMENDED_REFINEMENT if preset is None else preset)
    if settings.get("io_voxels") is None:
        size = [int(s) for s in spatial_size]
        settings.update(io_size=size, io_field_size=[max(2, s // 2) for s in size])
    known = set(settings) | {"io_size", "io_field_size", "io_voxels", "io_smoothness", "regularizer", "lmbda"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown refinement settings {unknown}; known: {sorted(known)}.")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def recommended_refinement(spatial_size: Sequence[int], name: str = "one-way") -> Refinement:
    """The instance-optimisation part of :func:`refinement_arguments` of the preset ``name``
    (:data:`REFINEMENT_PRESETS`) as one value for :func:`monai_icon.apps.register_files` (``refinement=``). The
    refinement's loss belongs to the model; set it as ``--refine`` does: ``model.similarity =
    monai_icon.losses.get_similarity("lncc", model.spatial_dims, kernel_size=5)`` (and for ``symmetric``
    ``model.regularizer = "gradicon"``, ``model.lmbda = 4.0``).

    Raises:
        ValueError: an unknown preset name.
    """
    if name not in REFINEMENT_PRESETS:
        raise ValueError(f"unknown refinement preset {name!r}; known: {sorted(REFINEMENT_PRESETS)}.")
    s = refinement_arguments(spatial_size, REFINEMENT_PRESETS[name])
    grid = {k: tuple(s[f"io_{k}"]) for k in ("size", "field_size") if s.get(f"io_{k}") is not None}
    return Refinement(steps=s["io_steps"], lr=s["io_lr"], mode=s["io_mode"], levels=s["io_levels"],
                      fine_steps=s["io_fine_steps"], smoothness=s.get("io_smoothness", Refinement().smoothness),
                      voxels=s.get("io_voxels"), **grid)
