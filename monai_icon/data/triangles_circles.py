# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's synthetic triangles & circles (supplement 5.1, Eq. 12 and 13)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["render_shape", "sample_shape_parameters", "TrianglesCirclesDataset"]


def render_shape(
    kind: str, center: Sequence[float], radius: float, angle: float = 0.0, image_size: int | Sequence[int] = 128
) -> np.ndarray:
    """Render one circle or triangle.

    Coordinates ``x`` (axis 0) and ``y`` (axis 1) run over ``[0, 1]`` with 0 and 1 on the first and last pixel.
    Circle: ``tanh(-40 (sqrt((x - cx)^2 + (y - cy)^2) - r))`` (Eq. 12); triangle:
    ``tanh(-40 (sqrt(...) - r cos(pi/3) / cos((atan2(x - cx, y - cy) + angle) mod (2 pi / 3) - pi / 3)))``
    (Eq. 13). Values are about 1 inside and -1 outside.

    Returns:
        ``[H, W]`` float32 array.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 2:
        raise ValueError(f"image_size must be an int or (H, W) with sizes >= 2, got {image_size}.")
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]), indexing="ij")
    dx, dy = x - center[0], y - center[1]
    distance = np.sqrt(dx**2 + dy**2)
    if kind == "circle":
        edge = radius
    elif kind == "triangle":
        edge = radius * np.cos(np.pi / 3) / np.cos(np.mod(np.arctan2(dx, dy) + angle, 2 * np.pi / 3) - np.pi / 3)
    else:
        raise ValueError(f"kind must be 'circle' or 'triangle', got {kind!r}.")
    return np.tanh(-40.0 * (distance - edge)).astype(np.float32)


def sample_shape_parameters(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one shape: a circle or a triangle with equal probability, centre in ``[0.4, 0.7]^2``, radius in
    ``[0.2, 0.4]``, angle in ``[0, 2 pi]`` (uniform)."""
    return {
        "kind": "circle" if rng.random() < 0.5 else "triangle",
        "center": (float(rng.uniform(0.4, 0.7)), float(rng.uniform(0.4, 0.7))),
        "radius": float(rng.uniform(0.2, 0.4)),
        "angle": float(rng.uniform(0.0, 2 * np.pi)),
    }


class TrianglesCirclesDataset(Dataset):
    """A seeded population of triangles and circles, rendered on access.

    Args:
        num_samples: number of images (the paper: 6,000 train and 6,000 test).
        image_size: side length or ``(H, W)`` (the paper: 128).
        seed: seed of the shape parameters; item ``i`` is the same image for the same seed.
        transform: optional callable applied to each item dictionary (e.g. a MONAI ``Compose``).

    Items are dictionaries ``{"image": [1, H, W] float32 tensor, "kind": str, "center", "radius", "angle"}``.
    """

    def __init__(
        self, num_samples: int, image_size: int | Sequence[int] = 128, seed: int = 0, transform: Callable | None = None
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        rng = np.random.default_rng(seed)
        self.parameters = [sample_shape_parameters(rng) for _ in range(num_samples)]
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.parameters)

    def __getitem__(self, index: int) -> dict[str, Any]:
        params = self.parameters[index]
        image = render_shape(params["kind"], params["center"], params["radius"], params["angle"], self.image_size)
        item = {"image": torch.from_numpy(image)[None], **params}
        return self.transform(item) if self.transform is not None else item
