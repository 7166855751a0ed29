#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Cost of one 3D training step of the T1-head recipes (not part of the test suite; docs/benchmarks.md).

Two U-Net steps of the demo's size (1.4 M parameters each) composed on a 64x64x32 grid, batch ``--batch``, Adam;
both directions, the ICON loss and its backward, as ``ICONTrainer`` runs them. Cases:

* ``grid64``: the images on the network grid (64x64x32), LNCC + GradICON there (no finer images);
* ``fine128``: the images at 128x128x64, the steps on 2x average-pooled inputs (``Downsample``), LNCC (window 5) on
  the full-resolution images, GradICON on the steps' 64x64x32 grid (``ICONLoss(regularizer_size=...)``), with the
  composed map evaluated exactly at every full-resolution point or, ``resample``, composed on the steps' grid and
  linearly interpolated (``Downsample(resample=True)``);

each in PyTorch's standard layout and in channels-last (``torch.channels_last_3d`` weights and images, as
``ICONTrainer(channels_last=True)``). Every round runs every variant once, in turn (so that load drifts hit all
alike); reported: medians over ``--repeats`` rounds after one warm-up round, each variant's median per-round
ratio to the first variant of its case, and the loss of the first step (same weights, data and jitter: equal
up to rounding between layouts).

The last two variants feed the steps space-to-depth ("unshuffled") inputs (``coarse_pool="unshuffle"``) and
compose three U-Net steps instead of two.

    python benchmarks/step3d_bench.py [--repeats 5] [--batch 2] [--threads 2] [--cases fine128] [--output FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from monai_icon.engines.trainer import channels_last_copy, register_pair, to_channels_last
from monai_icon.losses import ICONLoss
from monai_icon.losses.similarity import get_similarity
from monai_icon.networks import multistep_registration

SMALL = {"encoder_channels": [16, 32, 64, 64, 64], "decoder_channels": [64, 64, 32, 16, 16]}
UNSHUFFLED, THREE_STEPS = {"coarse_pool": "unshuffle"}, {"coarse_steps": 3}
VARIANTS = [  # (case, images, coarse factor, resample, channels-last, other multistep_registration arguments)
    ("grid64", (64, 64, 32), 1, False, False, {}),
    ("grid64", (64, 64, 32), 1, False, True, {}),
    ("fine128", (128, 128, 64), 2, False, False, {}),
    ("fine128", (128, 128, 64), 2, False, True, {}),
    ("fine128", (128, 128, 64), 2, True, False, {}),
    ("fine128", (128, 128, 64), 2, True, True, {}),
    ("fine128", (128, 128, 64), 2, True, True, UNSHUFFLED),
    ("fine128", (128, 128, 64), 2, True, True, THREE_STEPS),
]
LABELS = {"coarse_pool": "{} inputs", "coarse_steps": "{} steps"}


def variant_name(case: str, resample: bool, channels_last: bool, architecture: dict | None = None) -> str:
    parts = [case] + (["resample"] if resample else []) + (["channels-last"] if channels_last else [])
    parts += [LABELS.get(key, key + " {}").format(value) for key, value in (architecture or {}).items()]
    return ", ".join(parts)


def make_step(shape, factor: int, resample: bool, channels_last: bool, batch: int, channels: dict | None = None,
              device: str | torch.device = "cpu", architecture: dict | None = None):
    """A closure running one training step (U-Nets of ``channels``, default the demo's) on ``device``; returns the
    loss value (which waits for the device). ``architecture``: more ``multistep_registration`` arguments."""
    torch.manual_seed(0)
    net = multistep_registration(3, coarse_factor=factor, resample_coarse=resample, **(channels or SMALL),
                                 **(architecture or {})).to(device)
    with torch.no_grad():  # a non-trivial map, as after some training
        for name, p in net.named_parameters():
            if name.endswith("out.weight"):
                p.normal_(0, 1e-3)
    loss = ICONLoss(get_similarity("lncc", 3, kernel_size=5), 4.0, "gradicon", spatial_dims=3,
                    regularizer_size=tuple(-(-n // factor) for n in shape))  # the steps' own grid
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    a, b = torch.rand(batch, 1, *shape, device=device), torch.rand(batch, 1, *shape, device=device)
    if channels_last:
        to_channels_last(net)
        a, b = channels_last_copy(a), channels_last_copy(b)

    def step() -> float:
        torch.manual_seed(1)  # the regulariser's jitter
        optimizer.zero_grad(set_to_none=True)
        out = loss(a, b, *register_pair(net, a, b))
        out.loss.backward()
        optimizer.step()
        return float(out.loss.detach())

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default) or e.g. cuda")
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    p.add_argument("--cases", default="grid64,fine128", help="comma-separated cases to run (default: all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - {v[0] for v in VARIANTS})
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from grid64, fine128")
    variants = [v for v in VARIANTS if v[0] in cases]
    steps = [make_step(shape, f, r, cl, args.batch, device=args.device, architecture=extra)
             for _, shape, f, r, cl, extra in variants]
    first_loss = [step() for step in steps]  # warm-up round; the first step's loss
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(args.repeats):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    where = (torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda")
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"Device: {where}, torch {torch.__version__}, batch {args.batch}; medians of {args.repeats} rounds "
             "after one warm-up round.", "",
             "| step | images | s / step | / first of its case | first step's loss |", "|---|---|---|---|---|"]
    base = {}
    for i, (case, shape, _, resample, channels_last, extra) in enumerate(variants):
        base.setdefault(case, i)
        ratio = statistics.median(t / s for t, s in zip(times[i], times[base[case]]))
        lines.append(f"| {variant_name(case, resample, channels_last, extra)} | {'x'.join(map(str, shape))} | "
                     f"{statistics.median(times[i]):.3f} | {ratio:.2f} | {first_loss[i]:.6f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
