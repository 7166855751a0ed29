# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Knee laterality harmonisation: mirror one side's knees so that all look like the other side's."""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform

__all__ = [
    "SIDES",
    "normalise_side",
    "left_right_axis",
    "side_from_filename",
    "HarmoniseLaterality",
    "HarmoniseLateralityd",
]

SIDES = ("LEFT", "RIGHT")
_SIDE_IN_NAME = re.compile(r"(?:^|[^A-Za-z])(LEFT|RIGHT)(?:[^A-Za-z]|$)", re.IGNORECASE)
_SIDE_ALIASES = {"LEFT": "LEFT", "L": "LEFT", "RIGHT": "RIGHT", "R": "RIGHT"}


def normalise_side(side: Any) -> str:
    """``"LEFT"`` or ``"RIGHT"`` from ``left``/``L``/``RIGHT``/... (any case); ``ValueError`` otherwise."""
    key = str(side).strip().upper()
    if key not in _SIDE_ALIASES:
        raise ValueError(f"unknown knee side {side!r}: use 'LEFT' or 'RIGHT' (or 'L'/'R').")
    return _SIDE_ALIASES[key]


def side_from_filename(filename: str | Path) -> str | None:
    """The side named in an (OAI-style) file name, e.g. ``9000099_..._SAG_3D_DESS_LEFT_...nii.gz`` -> ``"LEFT"``;
    ``None`` when the name has neither ``LEFT`` nor ``RIGHT`` as a separate word (or has both)."""
    found = {m.upper() for m in _SIDE_IN_NAME.findall(Path(str(filename)).name)}
    return found.pop() if len(found) == 1 else None


def left_right_axis(affine: torch.Tensor | np.ndarray) -> int:
    """The array axis (0-based, spatial) that runs closest to the world left-right axis.

    ``affine`` is a voxel-to-world matrix ``[D+1, D+1]`` in RAS or LPS world coordinates (in both, world axis 0
    is left-right). For oblique grids the axis with the largest left-right direction cosine wins.

    Raises:
        ValueError: the affine is not square/invertible, or two axes are equally close to left-right (45 degrees).
    """
    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if aff.ndim != 2 or aff.shape[0] != aff.shape[1] or aff.shape[0] < 3:
        raise ValueError(f"affine must be a square [D+1, D+1] matrix, got shape {aff.shape}.")
    linear = aff[:-1, :-1]
    norms = np.linalg.norm(linear, axis=0)
    if np.any(norms == 0) or abs(np.linalg.det(linear)) < 1e-12:
        raise ValueError(f"affine is singular, cannot tell its orientation:\n{aff}")
    cosines = np.abs(linear[0]) / norms
    order = np.argsort(cosines)[::-1]
    if cosines[order[0]] - cosines[order[1]] < 1e-3:
        raise ValueError(f"two array axes are equally close to left-right (direction cosines {cosines}); "
                         "resample to a less oblique grid first.")
    return int(order[0])


class HarmoniseLaterality(InvertibleTransform, Transform):
    """Mirror a channel-first image ``[C, *spatial]`` in physical space when its knee side is not ``target_side``.

    The array is flipped along the axis that runs left-right in the image's own orientation
    (:func:`left_right_axis` of its affine) and the affine is kept, so the anatomy is mirrored about the volume's
    mid-sagittal plane: a right knee now looks like a left one in world coordinates, whatever the file's
    orientation. (MONAI's ``Flip`` instead updates the affine so that the world image stays the same.) Labels
    must be transformed with the same call (same side, same affine) so they stay aligned.

    Both the paper ("left knees are mirrored", target RIGHT) and the ICON reference code (right knees mirrored,
    target LEFT, the default) exist; pick with ``target_side``. Invertible (``Invertd`` undoes it).

    Args:
        target_side: the side every image should look like after the transform.
    """

    def __init__(self, target_side: str = "LEFT") -> None:
        self.target_side = normalise_side(target_side)

    def __call__(self, img: torch.Tensor, side: str) -> torch.Tensor:  # type: ignore[override]
        """Args: img ``[C, *spatial]`` (a MetaTensor with its affine, or a tensor in RAS array order);
        side: this image's knee side."""
        if not isinstance(img, torch.Tensor) or img.ndim < 3:
            raise ValueError(f"expected a channel-first image [C, *spatial] tensor, got {type(img).__name__} "
                             f"of shape {tuple(getattr(img, 'shape', ()))}.")
        flip = normalise_side(side) != self.target_side
        affine = img.affine if isinstance(img, MetaTensor) else torch.eye(img.ndim)
        axis = left_right_axis(affine)
        out = torch.flip(img, dims=[axis + 1]) if flip else img.clone()
        if isinstance(out, MetaTensor):
            out.meta["laterality"] = self.target_side
            self.push_transform(out, extra_info={"flipped": flip, "axis": axis})
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        info = transform["extra_info"]
        return torch.flip(data, dims=[info["axis"] + 1]) if info["flipped"] else data


class HarmoniseLateralityd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`HarmoniseLaterality`: mirror ``keys`` (e.g. an image and its label, always
    flipped together) when the item's knee side differs from ``target_side``.

    The side comes from ``data[side_key]`` (``"LEFT"``/``"RIGHT"``/``"L"``/``"R"``) when present, otherwise
    from the file name of the first key's image (OAI names carry ``LEFT``/``RIGHT``).

    Args:
        keys: images/labels of one knee.
        side_key: metadata key holding the side.
        target_side: see :class:`HarmoniseLaterality` (default ``"LEFT"``, as the ICON reference code).

    Raises:
        ValueError: no side in the item nor in the file name, or an unknown side.
    """

    def __init__(self, keys: KeysCollection, side_key: str = "side", target_side: str = "LEFT",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.side_key = side_key
        self.harmonise = HarmoniseLaterality(target_side)

    def _side(self, d: Mapping[Hashable, Any]) -> str:
        if d.get(self.side_key) is not None:
            return normalise_side(d[self.side_key])
        names = [getattr(d[k], "meta", {}).get("filename_or_obj", "") for k in self.key_iterator(d)]
        for name in names:
            side = side_from_filename(name) if name else None
            if side is not None:
                return side
        raise ValueError(f"cannot tell the knee side: no {self.side_key!r} entry in the item and no LEFT/RIGHT in "
                         f"the file names {names}.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        side = self._side(d)
        for key in self.key_iterator(d):
            d[key] = self.harmonise(d[key], side)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.harmonise.inverse(d[key])
        return d
