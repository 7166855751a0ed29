# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Atlas-based segmentation with a registration network: the network that MONAI Label (and any segmentation
bundle) can serve. One image in, the atlas labels warped onto it out."""

from __future__ import annotations

import torch
import torch.nn as nn

from monai_icon.apps.register import instance_optimise, restored_weights
from monai_icon.apps.validation import check_count, check_label_values, check_positive_number
from monai_icon.losses.icon import ICONLoss
from monai_icon.networks.maps import interpolate, one_hot_labels
from monai_icon.networks.registration_net import register_one_way

__all__ = ["AtlasSegmentation"]


class AtlasSegmentation(nn.Module):
    """Segment an image by registering an atlas to it and warping the atlas labels.

    ``forward(image)`` registers the atlas (moving) to ``image`` (fixed) with ``network`` and returns the atlas
    labels warped onto the image's grid as per-class probabilities (one-hot labels, linearly interpolated):
    take the arg-max (``AsDiscreted(argmax=True)``) for a label map. The atlas must already be on the network
    grid, preprocessed like the images (e.g. by the same transforms in the bundle config).

    Args:
        network: a :class:`~monai_icon.networks.RegistrationNet` (its weights are this module's state dict, under
            ``network.``; the atlas is not part of it).
        atlas_image: ``[1, *N]`` (channel first) atlas intensities.
        atlas_label: ``[1, *N]`` integer atlas labels (0 = background).
        num_classes: number of label values including the background (default: ``max label + 1``).
        io_steps, io_lr, loss: optional instance optimisation on each image (weights restored afterwards);
            ``loss`` defaults to GradICON + LNCC with lambda 1.5, the published uniGradICON recipe.
        atlas_mask: optional ``[1, *N]`` mask of the atlas (nonzero inside): the atlas is zeroed outside it before
            the network (input masking) and instance optimisation compares the images inside it (loss masking).

    Shapes:
        ``[B, 1, *N]`` -> ``[B, num_classes, *N]``.
    """

    atlas_image: torch.Tensor  # buffers (not in the state dict), declared for type checkers
    atlas_onehot: torch.Tensor
    atlas_mask: torch.Tensor | None

    def __init__(
        self,
        network: nn.Module,
        atlas_image: torch.Tensor,
        atlas_label: torch.Tensor,
        num_classes: int | None = None,
        io_steps: int = 0,
        io_lr: float = 2e-5,
        loss: ICONLoss | None = None,
        atlas_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        image, label = torch.as_tensor(atlas_image).float().unsqueeze(0), torch.as_tensor(atlas_label).unsqueeze(0)
        if image.shape != label.shape or image.shape[1] != 1 or image.ndim not in (4, 5):
            raise ValueError(f"the atlas image and label must be channel-first [1, *N] of the same 2D/3D shape, "
                             f"got {tuple(atlas_image.shape)} and {tuple(atlas_label.shape)}.")
        if not torch.isfinite(image).all():
            raise ValueError("the atlas image contains NaN or infinite values.")
        check_label_values(label, "the atlas label")
        if num_classes is not None:
            check_count(num_classes, "num_classes", minimum=2)
            if int(label.max()) >= num_classes:
                raise ValueError(f"the atlas label holds label {int(label.max())} but num_classes is {num_classes}.")
        self.network = network
        self.num_classes = int(num_classes if num_classes is not None else int(label.max()) + 1)
        self.register_buffer("atlas_image", image.as_subclass(torch.Tensor), persistent=False)
        self.register_buffer(
            "atlas_onehot", one_hot_labels(label.long().as_subclass(torch.Tensor), self.num_classes), persistent=False
        )
        self.io_steps, self.io_lr = check_count(io_steps, "io_steps"), check_positive_number(io_lr, "io_lr")
        self.loss = loss
        mask = None
        if atlas_mask is not None:
            mask = (torch.as_tensor(atlas_mask) > 0).float().unsqueeze(0).as_subclass(torch.Tensor)
            if mask.shape != image.shape:
                raise ValueError(f"the atlas mask must be [1, *N] like the atlas image {tuple(atlas_image.shape)}, "
                                 f"got {tuple(atlas_mask.shape)}.")
        self.register_buffer("atlas_mask", mask, persistent=False)

    def _io_loss(self) -> ICONLoss:
        """The instance optimisation loss: ``loss``, or the published recipe's (GradICON + LNCC, lambda 1.5)."""
        if self.loss is not None:
            return self.loss
        return ICONLoss("lncc", 1.5, "gradicon", spatial_dims=self.atlas_image.ndim - 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[2:] != self.atlas_image.shape[2:] or image.shape[1] != 1:
            raise ValueError(
                f"expected images [B, 1, {', '.join(map(str, self.atlas_image.shape[2:]))}] on the atlas' network "
                f"grid, got {tuple(image.shape)}; resample them first (the bundle's preprocessing does)."
            )
        atlas = self.atlas_image.expand(image.shape[0], *self.atlas_image.shape[1:])
        masks = None
        if self.atlas_mask is not None:  # input masking of the atlas, and the similarity restricted to its mask
            mask = self.atlas_mask.expand(image.shape[0], *self.atlas_mask.shape[1:])
            atlas = atlas * mask
            masks = (mask, torch.ones_like(mask))
        network = self.network
        with restored_weights(network):
            if self.io_steps > 0:
                with torch.enable_grad():
                    instance_optimise(network, atlas, image, self._io_loss(), self.io_steps, self.io_lr, masks)
            with torch.no_grad():
                phi = register_one_way(network, atlas, image)
                labels = self.atlas_onehot.expand(image.shape[0], *self.atlas_onehot.shape[1:])
                return interpolate(labels, phi.grid(image.shape[2:]))
