#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The intensity percentiles that bring an image onto a network grid (not part of the test suite;
docs/benchmarks.md): the 1st and 99th percentile of a 3D image by

* ``torch.quantile`` (a full sort; what MONAI's ``ScaleIntensityRangePercentiles`` runs for up to a million voxels),
* ``torch.kthvalue`` (two selections per percentile; :func:`monai_icon.transforms.network_grid.percentile_range`
  without the CPU backend),
* NumPy's partial sort (the CPU backend's ``selection_quantiles``, :func:`monai_icon.backend.quantiles`, the default).

Images: a smooth random volume (a third of its voxels zero, as around a brain) on the grid a refined pair compares
its images on (614,400 voxels) and on a 64x32x64 grid. Every round runs every
variant once, in turn; printed: medians over ``--rounds`` rounds after a warm-up round, each variant's median ratio
to ``torch.quantile`` in the same rounds, and the largest difference of its values from it.

    python benchmarks/percentile_bench.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_icon.backend import CPUBackend, use_backend  # noqa: E402
from monai_icon.transforms.network_grid import percentile_range  # noqa: E402

PERCENTILES = (1.0, 99.0)


def _image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[max(2, s // 8) for s in shape], generator=g)
    image = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]
    return torch.where(image < 0.35, torch.zeros_like(image), image)


def _torch_quantile(image: torch.Tensor) -> tuple[float, float]:
    q = torch.quantile(image.reshape(-1), torch.tensor([p / 100.0 for p in PERCENTILES]))
    return float(q[0]), float(q[1])


def _with(mode: str):
    def run(image: torch.Tensor) -> tuple[float, float]:
        with use_backend(CPUBackend(mode), "cpu"):
            return percentile_range(image, PERCENTILES)
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {"torch.quantile": _torch_quantile, "kthvalue (backend off)": _with("off"),
                "selection (backend default)": _with("auto")}
    print("| image | variant | median ms | ratio to torch.quantile | largest difference |")
    print("|---|---|---|---|---|")
    for shape in ((80, 96, 80), (64, 32, 64)):
        image = _image(shape)
        reference = _torch_quantile(image)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds + 1):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(image)
                if round_index:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        base = times["torch.quantile"]
        for name, fn in variants.items():
            ratio = statistics.median(t / b for t, b in zip(times[name], base))
            error = max(abs(a - b) for a, b in zip(fn(image), reference))
            print(f"| {'x'.join(map(str, shape))} | {name} | {statistics.median(times[name]) * 1e3:.1f} | "
                  f"{ratio:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
