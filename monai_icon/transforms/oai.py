# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's OAI knee MRI preprocessing (Sec. 4.1) as MONAI dictionary transforms.

Per image: load (with its affine) -> channel first -> reorient to ``axcodes`` -> mirror knees of the other side
(:class:`~monai_icon.transforms.HarmoniseLateralityd`, labels identically) -> resize to the network grid
(``"area"`` = average pooling for images, nearest for labels) -> 1st percentile to 0, 99th to 1, clamp.

The default grid is the paper's 192x192x80 with axes ordered ``"PIR"`` (two in-plane sagittal axes, then the
left-right slices, as OAI's 384x384x160 DESS volumes pooled by 2); the first stage of the 3D model sees it
pooled to 96x96x40 by its :class:`~monai_icon.networks.Downsample` block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
    ScaleIntensityRangePercentilesd,
)

from monai_icon.transforms.laterality import HarmoniseLateralityd

__all__ = ["OAI_SPATIAL_SIZE", "oai_preprocessing", "oai_train_transforms", "oai_pair_transforms"]

OAI_SPATIAL_SIZE = (192, 192, 80)


def oai_preprocessing(
    image_keys: Sequence[str],
    label_keys: Sequence[str] = (),
    side_key: str | None = "side",
    spatial_size: Sequence[int] = OAI_SPATIAL_SIZE,
    axcodes: str | None = "PIR",
    target_side: str | None = "LEFT",
    percentiles: tuple[float, float] | None = (1.0, 99.0),
    load: bool = True,
    allow_missing_keys: bool = False,
) -> list:
    """The OAI transforms for one knee's image(s) and label(s) (see the module docstring), as a list.

    Args:
        image_keys: image keys (file paths when ``load``, else channel-first MetaTensors).
        label_keys: label keys of the same knee, transformed identically (nearest-neighbour resizing, int64).
        side_key: item key with the knee side (falls back to ``LEFT``/``RIGHT`` in the file name).
        spatial_size: network grid after reorientation.
        axcodes: orientation to reorient to (``None``: keep the file's array order).
        target_side: side every knee should look like (``None``: no mirroring).
        percentiles: intensity percentiles mapped to 0 and 1 with clamping (``None``: keep intensities).
        load: start with ``LoadImaged`` (+ channel first).
    """
    keys = [*image_keys, *label_keys]
    opts: dict[str, Any] = {"allow_missing_keys": allow_missing_keys}
    xforms: list = []
    if load:
        xforms.append(LoadImaged(keys, image_only=True, ensure_channel_first=True, **opts))
    if axcodes is not None:
        xforms.append(Orientationd(keys, axcodes=axcodes, labels=None, **opts))  # axis labels from the image space
    if target_side is not None:
        xforms.append(HarmoniseLateralityd(keys, side_key=str(side_key), target_side=target_side, **opts))
    xforms.append(Resized(list(image_keys), spatial_size=tuple(spatial_size), mode="area", **opts))
    if label_keys:
        xforms.append(Resized(list(label_keys), spatial_size=tuple(spatial_size), mode="nearest-exact", **opts))
    if percentiles is not None:
        lower, upper = percentiles
        xforms.append(
            ScaleIntensityRangePercentilesd(
                list(image_keys), lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, **opts
            )
        )
    xforms.append(EnsureTyped(list(image_keys), dtype=torch.float32, **opts))
    if label_keys:
        xforms.append(EnsureTyped(list(label_keys), dtype=torch.int64, **opts))
    return xforms


def oai_train_transforms(
    spatial_size: Sequence[int] = OAI_SPATIAL_SIZE,
    axcodes: str | None = "PIR",
    target_side: str | None = "LEFT",
    with_label: bool = False,
    percentiles: tuple[float, float] | None = (1.0, 99.0),
    with_mask: bool = False,
) -> Compose:
    """``Compose`` for single knees of a training datalist (``{"image", "label", "mask", "side"}`` items): cache its
    output (e.g. ``CacheDataset``) and draw random pairs with :class:`~monai_icon.data.RandomPairDataset`.
    ``with_mask``: the item's ``mask`` file follows the image like a label map (nearest resizing) and is binarised
    (nonzero = inside: 1, else 0), for loss masking / input masking in :class:`~monai_icon.engines.ICONTrainer`."""
    labels = ("label",) if with_label else ()
    masks = ("mask",) if with_mask else ()
    xforms = oai_preprocessing(("image",), (*labels, *masks), "side", spatial_size, axcodes, target_side, percentiles)
    if with_mask:
        xforms.append(AsDiscreted("mask", threshold=0.5))  # integer masks after nearest resizing: nonzero -> 1
    return Compose(xforms)


def oai_pair_transforms(
    spatial_size: Sequence[int] = OAI_SPATIAL_SIZE,
    axcodes: str | None = "PIR",
    target_side: str | None = "LEFT",
    with_labels: bool = True,
    percentiles: tuple[float, float] | None = (1.0, 99.0),
) -> Compose:
    """``Compose`` for fixed evaluation pairs (``{"moving_image", "fixed_image", "moving_label", "fixed_label",
    "moving_side", "fixed_side"}`` items, e.g. the ``test_pairs`` of :func:`~monai_icon.data.build_knee_datalist`);
    each knee is mirrored according to its own side."""
    xforms = []
    for role in ("moving", "fixed"):
        labels = (f"{role}_label",) if with_labels else ()
        xforms += oai_preprocessing(
            (f"{role}_image",), labels, f"{role}_side", spatial_size, axcodes, target_side, percentiles
        )
    return Compose(xforms)
