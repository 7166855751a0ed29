# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Random moving/fixed pairs drawn from a population of images."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["RandomPairDataset"]


class RandomPairDataset(Dataset):
    """Pairs ``(moving, fixed)`` of two different items of ``data``.

    Args:
        data: a sequence/dataset of dictionaries (e.g. :class:`TrianglesCirclesDataset`, MONAI ``Dataset``).
        num_pairs: length of the dataset (pairs per epoch).
        seed: None draws a fresh random pair on every access (from torch's RNG, so ``torch.manual_seed`` and
            DataLoader worker seeding apply); an integer fixes the list of pairs (evaluation).
        keys: keys copied from each item as ``moving_<key>`` and ``fixed_<key>`` (missing keys are skipped).
        transform: optional callable applied to the pair dictionary.

    Items: ``{"moving_image": ..., "fixed_image": ..., "moving_index": i, "fixed_index": j,
    "pair_id": "0000i_to_0000j", ...}``.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | Dataset,
        num_pairs: int,
        seed: int | None = None,
        keys: Sequence[str] = ("image", "label"),
        transform: Callable | None = None,
    ) -> None:
        size = len(data)  # type: ignore[arg-type]  # a map-style Dataset has __len__, its type does not say so
        if size < 2:
            raise ValueError(f"need at least two images to draw pairs, got {size}.")
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}.")
        self.data, self.num_pairs, self.keys, self.transform = data, num_pairs, tuple(keys), transform
        self.pairs: np.ndarray | None = None
        if seed is not None:
            rng = np.random.default_rng(seed)
            first = rng.integers(0, size, num_pairs)
            second = (first + rng.integers(1, size, num_pairs)) % size
            self.pairs = np.stack([first, second], axis=1)

    def __len__(self) -> int:
        return self.num_pairs

    def _pair(self, index: int) -> tuple[int, int]:
        if self.pairs is not None:
            return int(self.pairs[index, 0]), int(self.pairs[index, 1])
        n = len(self.data)  # type: ignore[arg-type]
        first = int(torch.randint(n, ()).item())
        return first, (first + int(torch.randint(1, n, ()).item())) % n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"pair index {index} out of range for {self.num_pairs} pairs.")
        i, j = self._pair(index)
        moving, fixed = self.data[i], self.data[j]
        item: dict[str, Any] = {"moving_index": i, "fixed_index": j, "pair_id": f"{i:05d}_to_{j:05d}"}
        for key in self.keys:
            if key in moving and key in fixed:
                item[f"moving_{key}"], item[f"fixed_{key}"] = moving[key], fixed[key]
        return self.transform(item) if self.transform is not None else item
