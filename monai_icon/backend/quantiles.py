# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Quantiles of CPU images by selection (the backend's ``selection_quantiles``).

``torch.quantile`` sorts its whole input: on the CPU, for the intensity percentiles of a 3D image of half a million
voxels, that is about 0.1 s per image, a sizeable part of a fast registration. NumPy's ``percentile`` finds the same
order statistics by partial sorting (``numpy.partition``, linear time) and interpolates them the same way
(``method="linear"``, ``torch.quantile``'s default): the same values up to float rounding, several times faster
(``benchmarks/percentile_bench.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from monai_icon.backend.settings import active

__all__ = ["quantiles"]


def quantiles(values: torch.Tensor, q: Sequence[float]) -> torch.Tensor | None:
    """The quantiles ``q`` (each in ``[0, 1]``) of all of ``values`` (any shape), as ``torch.quantile(values.flatten(),
    q)`` computes them (linear interpolation between order statistics; ``nan`` if any value is ``nan``): a float
    tensor ``[len(q)]`` in ``values``' dtype, by NumPy's partial sort where the active backend has
    ``selection_quantiles`` and ``values`` is a float32/float64 CPU tensor. ``None`` where it does not run: the
    caller computes them."""
    if not active().selection_quantiles or values.device.type != "cpu":
        return None
    if values.dtype not in (torch.float32, torch.float64) or values.numel() == 0:
        return None
    array = values.detach().reshape(-1).numpy()
    out = np.percentile(array, [100.0 * float(v) for v in q], method="linear")
    return torch.as_tensor(np.asarray(out), dtype=values.dtype)
