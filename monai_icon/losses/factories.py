# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Factories that build the bundles' losses from plain config values (called as ``_target_`` components, e.g.
``_target_: monai_icon.losses.factories.similarity_loss``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch.nn.modules.loss import _Loss

from monai_icon.losses.map_supervision import MapSupervisionLoss
from monai_icon.losses.multiscale import MultiScaleSimilarity
from monai_icon.losses.similarity import DEFAULT_LNCC_KERNEL, get_similarity

__all__ = ["map_supervision_loss", "similarity_loss"]


def similarity_loss(name: str, spatial_dims: int, lncc_kernel: int | str = DEFAULT_LNCC_KERNEL,
                    scales: Sequence[int | str] = (1,)) -> _Loss:
    """The image similarity ``name`` (see :func:`~monai_icon.losses.get_similarity`; LNCC with a window of
    ``lncc_kernel`` voxels), summed over the images average-pooled by each of ``scales``
    (:class:`~monai_icon.losses.MultiScaleSimilarity`) unless ``scales`` is ``[1]`` (the images alone)."""
    kwargs = {"kernel_size": int(lncc_kernel)} if str(name).lower() == "lncc" else {}
    single = get_similarity(name, spatial_dims, **kwargs)
    if list(scales) == [1]:
        return single
    return MultiScaleSimilarity(single, [int(f) for f in scales])


def map_supervision_loss(self_pairs: float | str) -> MapSupervisionLoss | None:
    """:class:`~monai_icon.losses.MapSupervisionLoss` when known-map pairs are drawn (``self_pairs`` > 0, their
    probability), else ``None`` (the ICON loss alone)."""
    return MapSupervisionLoss() if float(self_pairs) > 0 else None
