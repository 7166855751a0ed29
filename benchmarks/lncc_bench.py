#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The LNCC's forward + backward, eager against compiled (``monai_icon.losses.compiled_lncc``; not part of the
test suite; ``docs/benchmarks.md``).

Times :class:`~monai_icon.losses.similarity.StackedLNCCLoss` (``reduction="none"``, then a mean per pair, the
gradient for the warped image only, as in training) outside and inside
:func:`~monai_icon.losses.compiled_lncc.compiled_lncc`, alternated round by round, medians of ``--repeats`` rounds
after one warm-up call each (the first compiled call, which waits for the compiler, is reported apart). Errors are
the largest differences of the compiled value and gradient from the eager ones (the gradient's relative to its
largest magnitude).

    python benchmarks/lncc_bench.py                        # the T1-head demo's 4 x 1 x 128 x 64 x 128, window 5
    python benchmarks/lncc_bench.py --shape 4 1 64 32 64 --kernel 5 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from monai_icon.losses.compiled_lncc import compiled_lncc, use_compiled_lncc
from monai_icon.losses.similarity import StackedLNCCLoss


def value_and_grad(loss: StackedLNCCLoss, pred: torch.Tensor, target: torch.Tensor, compiled: bool):
    """The per-voxel loss and the gradient of its per-pair mean (summed over pairs) with respect to ``pred``."""
    with compiled_lncc(compiled):
        p = pred.clone().requires_grad_(True)
        value = loss(p, target)
        value.reshape(pred.shape[0], -1).mean(1).sum().backward()
    return value.detach(), p.grad


def run(shape: list[int], kernel: int, repeats: int, seed: int = 0) -> dict:
    """Milliseconds per forward + backward (medians), the first compiled call's seconds and the errors."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g)
    target = (pred + 0.3 * torch.rand(shape, generator=g)) ** 1.5
    loss = StackedLNCCLoss(spatial_dims=len(shape) - 2, kernel_size=kernel, reduction="none")
    with compiled_lncc(True):
        taken = use_compiled_lncc(pred, target)
    start = time.perf_counter()
    compiled = value_and_grad(loss, pred, target, True)
    first = time.perf_counter() - start
    eager = value_and_grad(loss, pred, target, False)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            value_and_grad(loss, pred, target, name == "compiled")
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {
        "shape": shape, "kernel": kernel, "compiled_taken": taken, "first_compiled_s": first, "eager_ms": ms["eager"],
        "compiled_ms": ms["compiled"], "ratio": ms["compiled"] / ms["eager"],
        "value_error": (compiled[0] - eager[0]).abs().max().item(),
        "grad_error": ((compiled[1] - eager[1]).abs().max() / eager[1].abs().max()).item(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[4, 1, 128, 64, 128], help="B C *N of the images")
    p.add_argument("--kernel", type=int, default=5, help="LNCC window (voxels)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.shape, args.kernel, args.repeats)
    print(f"LNCC forward + backward, {args.shape}, window {args.kernel}, {args.threads} threads: eager "
          f"{result['eager_ms']:.1f} ms, compiled {result['compiled_ms']:.1f} ms ({result['ratio']:.2f}x; compiled "
          f"path taken: {result['compiled_taken']}; first compiled call {result['first_compiled_s']:.1f} s); value "
          f"error {result['value_error']:.1e}, gradient error {result['grad_error']:.1e} (relative)")
    return result


if __name__ == "__main__":
    main()
