# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Factories that build the bundles' optional training transforms from plain config values.

Each returns ``None`` when its setting is off (the transform a MONAI ``_disabled_`` component would leave out), and
reads numbers given as strings on a command line. The bundle configs call them as ``_target_`` components, e.g.
``_target_: monai_icon.transforms.factories.batch_augmentation``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.transforms import RandFlipd

from monai_icon.config import as_bool
from monai_icon.transforms.augment import RandBatchAugmentd, chain_batch_transforms
from monai_icon.transforms.grid import check_network_grid
from monai_icon.transforms.self_pair import RandSelfPaird
from monai_icon.transforms.synthesis import RandLabelSynthesisd

__all__ = ["batch_augmentation", "batch_transform_chain", "check_datalist_grid", "label_synthesis", "pair_flip",
           "self_pairing", "training_keys"]

PAIR_KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label", "moving_mask", "fixed_mask")


def batch_augmentation(
    keys: Sequence[str],
    rotate_degrees: float | str = 0.0,
    scale: float | str = 0.0,
    translate: float | str = 0.0,
    deform: float | str = 0.0,
    deform_points: int | Sequence[int] = 5,
    deform_random: bool = False,
    gamma: float | str = 1.0,
    follow: Mapping[str, str] | None = None,
    seed: int | None = 0,
) -> RandBatchAugmentd | None:
    """:class:`~monai_icon.transforms.RandBatchAugmentd` with these arguments (numbers read with ``float``);
    ``None`` when it would change nothing: no rotation, scaling, shift or deformation and ``gamma <= 1``."""
    rotate_degrees, scale, translate = float(rotate_degrees), float(scale), float(translate)
    deform, gamma = float(deform), float(gamma)
    if not (rotate_degrees or scale or translate or deform or gamma > 1):
        return None
    return RandBatchAugmentd(list(keys), rotate_degrees=rotate_degrees, scale=scale, translate=translate,
                             deform=deform, deform_points=deform_points, deform_random=deform_random, gamma=gamma,
                             follow=follow, seed=seed)


def pair_flip(prob: float | str, spatial_axis: Sequence[int], seed: int) -> RandFlipd | None:
    """MONAI ``RandFlipd`` mirroring a whole pair (both images, and their labels and masks where present) along
    ``spatial_axis`` with probability ``prob``, drawing with ``seed``; ``None`` when ``prob`` is 0."""
    if not float(prob) > 0:
        return None
    flip = RandFlipd(keys=list(PAIR_KEYS), prob=float(prob), spatial_axis=list(spatial_axis), allow_missing_keys=True)
    return flip.set_random_state(seed=seed)


def self_pairing(
    prob: float | str,
    deform: float | str,
    gamma: float | str = 1.0,
    follow: Mapping[str, str] | None = None,
    seed: int | None = 0,
    keys: Sequence[str] = ("moving_image", "fixed_image"),
) -> RandSelfPaird | None:
    """:class:`~monai_icon.transforms.RandSelfPaird` (known-map pairs: with probability ``prob`` the fixed image is
    the moving one under a random deformation of ``deform`` voxels); ``None`` when ``prob`` is 0."""
    if not float(prob) > 0:
        return None
    return RandSelfPaird(keys=list(keys), prob=float(prob), deform=float(deform), gamma=float(gamma), follow=follow,
                         seed=seed)


def label_synthesis(
    prob: float,
    shapes_prob: float = 0.0,
    drop_prob: float = 0.0,
    bias: float = 0.3,
    keep_labels: bool = False,
    seed: int | None = 0,
) -> RandLabelSynthesisd | None:
    """:class:`~monai_icon.transforms.RandLabelSynthesisd` (images drawn from the label maps); ``None`` when both
    ``prob`` and ``shapes_prob`` are 0."""
    if not (float(prob) > 0 or float(shapes_prob) > 0):
        return None
    return RandLabelSynthesisd(prob=prob, shapes_prob=shapes_prob, drop_prob=drop_prob, bias=bias,
                               keep_labels=keep_labels, seed=seed)


def batch_transform_chain(transforms: Sequence[Callable | None]) -> Callable | None:
    """The ``transforms`` that are not ``None``, applied in order (see
    :func:`~monai_icon.transforms.chain_batch_transforms`): ``None``, one transform, or a ``Compose``."""
    return chain_batch_transforms(*transforms)


def training_keys(labels: bool, masks: bool | str) -> list[str]:
    """The keys a training pair is drawn with: ``image``, and ``label`` / ``mask`` when they are loaded (``masks``
    read by :func:`~monai_icon.config.as_bool`, as the ``use_masks`` setting)."""
    return ["image"] + (["label"] if labels else []) + (["mask"] if as_bool(masks, "use_masks") else [])


def check_datalist_grid(datalist: Sequence[Mapping[str, Any]], spatial_size: Sequence[int],
                        axcodes: str | None) -> tuple[float, ...] | None:
    """:func:`~monai_icon.transforms.check_network_grid` on the ``image`` of the first item of ``datalist`` (a
    warning when the grid stretches one axis much more than another); ``None`` for an empty datalist."""
    if not datalist:
        return None
    return check_network_grid(datalist[0]["image"], spatial_size, axcodes)
