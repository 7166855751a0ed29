# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Dictionary transforms for moving/fixed pairs: shape checks and warping by a network's voxel DDF."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform

__all__ = ["EnsureSameShaped", "Warpd"]


class EnsureSameShaped(MapTransform):
    """Raise a ``ValueError`` naming the keys and shapes unless all ``keys`` have the same shape (e.g. a moving
    and a fixed image that a registration network will take together)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        shapes = {key: tuple(d[key].shape) for key in self.key_iterator(d)}
        if len(set(shapes.values())) > 1:
            detail = ", ".join(f"{k}: {s}" for k, s in shapes.items())
            raise ValueError(f"the images of a pair must have the same shape (resample them first); got {detail}.")
        return d


def _stem(meta: Mapping) -> str:
    name = Path(str(meta.get("filename_or_obj", "image"))).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class Warpd(MapTransform):
    """Warp ``keys`` (moving images, channel-first ``[C, *N]``) with the voxel DDF in ``ddf_key``, MONAI
    convention (channel ``i`` in voxels along axis ``i + 1`` of the un-batched image), using
    ``monai.networks.blocks.Warp``.

    The results are written to ``output_postfix``-suffixed keys (``moving_image`` -> ``moving_image_warped``) or
    in place. When ``fixed_key`` is given, each result and a copy of the DDF (``<ddf_key>_ddf``... see
    ``ddf_output_key``) carry the fixed image's metadata (the warped image lies on the fixed grid), renamed
    ``<moving>_to_<fixed>`` so that ``SaveImaged`` writes one file per pair.

    Args:
        keys: images to warp.
        ddf_key: key of the voxel DDF ``[D, *N]``.
        fixed_key: key of the fixed image whose metadata the outputs take.
        mode, padding_mode: interpolation of ``monai.networks.blocks.Warp``.
        output_postfix: suffix of the output keys; empty string = in place.
        ddf_output_key: where to put the DDF with the fixed metadata (None: leave the DDF alone).
    """

    def __init__(
        self,
        keys: KeysCollection,
        ddf_key: str = "pred",
        fixed_key: str | None = None,
        mode: str = "bilinear",
        padding_mode: str = "border",
        output_postfix: str = "warped",
        ddf_output_key: str | None = "ddf",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ddf_key, self.fixed_key = ddf_key, fixed_key
        self.warp = Warp(mode=mode, padding_mode=padding_mode)
        self.output_postfix, self.ddf_output_key = output_postfix, ddf_output_key

    def _with_fixed_meta(self, tensor: torch.Tensor, d: Mapping, moving_key: Hashable) -> torch.Tensor:
        if self.fixed_key is None:
            return tensor
        fixed = d[self.fixed_key]
        meta = dict(getattr(fixed, "meta", {}))
        moving_meta = getattr(d[moving_key], "meta", {})
        meta["filename_or_obj"] = f"{_stem(moving_meta)}_to_{_stem(meta)}"
        return MetaTensor(torch.as_tensor(tensor), meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ddf = torch.as_tensor(d[self.ddf_key])
        first = None
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            if image.shape[1:] != ddf.shape[1:] or ddf.shape[0] != ddf.ndim - 1:
                raise ValueError(
                    f"{key!r} of shape {tuple(image.shape)} cannot be warped by a DDF of shape {tuple(ddf.shape)} "
                    "(expected [D, *spatial] with the image's spatial shape)."
                )
            warped = self.warp(image[None].float(), ddf[None].to(image.device).float())[0]
            out_key = f"{key}_{self.output_postfix}" if self.output_postfix else key
            d[out_key] = self._with_fixed_meta(warped, d, key)
            first = first or key
        if self.ddf_output_key is not None and first is not None:
            d[self.ddf_output_key] = self._with_fixed_meta(ddf, d, first)
        return d
