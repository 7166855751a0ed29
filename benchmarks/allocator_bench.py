#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The T1-head demo's 3D training step with glibc's default allocator settings and with
:func:`monai_icon.cpu_allocator.tune_cpu_allocator` (not part of the test suite; docs/benchmarks.md).

The setting cannot be undone inside a process, so every measurement is its own process: rounds alternate the two
(``default``, ``tuned``, ``default``, ...) so that load drifts hit both alike. Each process builds the step of
``benchmarks/step3d_bench.py`` on the demo's grid (images 128x64x128, two U-Net steps on 2x pooled inputs, LNCC on
the images, GradICON on 64x32x64, channels-last, batch 2), runs one warm-up step and ``--steps`` timed steps, and
reports the median seconds per step and the minor page faults per step. Printed: medians over the rounds, and the
median of the per-round ratios tuned / default.

    python benchmarks/allocator_bench.py [--rounds 5] [--steps 3] [--threads 2] [--shape 128,64,128] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, statistics, sys, time
sys.path.insert(0, {benchmarks!r})
import torch
from monai_icon.cpu_allocator import tune_cpu_allocator
mode, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape = tuple(int(v) for v in sys.argv[4].split(","))
applied = tune_cpu_allocator() if mode == "tuned" else False
torch.set_num_threads(threads)
from step3d_bench import make_step
step = make_step(shape, 2, True, True, 2)
step()
times, faults = [], []
for _ in range(steps):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({{"applied": applied, "step": statistics.median(times), "faults": statistics.median(faults)}}))
"""


def measure(mode: str, steps: int, threads: int, shape: tuple[int, ...] = (128, 64, 128)) -> dict:
    """One process: ``mode`` ``"default"`` or ``"tuned"``; returns ``applied``, ``step`` (median seconds) and
    ``faults`` (median minor page faults per step)."""
    code = _CHILD.format(benchmarks=str(ROOT / "benchmarks"))
    out = subprocess.run([sys.executable, "-c", code, mode, str(steps), str(threads), ",".join(map(str, shape))],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="128,64,128", help="the images' grid (the steps run on half of it)")
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(measure(mode, args.steps, args.threads, shape))
    if not all(r["applied"] for r in runs["tuned"]):
        print("note: tune_cpu_allocator() did not apply here (the C library is not glibc)")
    ratio = statistics.median(t["step"] / d["step"] for t, d in zip(runs["tuned"], runs["default"]))
    lines = [f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, images {args.shape}; "
             f"{args.rounds} rounds of one "
             f"process per setting, each the median of {args.steps} steps after a warm-up step.", "",
             "| allocator | s / step | minor page faults / step |", "|---|---|---|"]
    for mode, label in (("default", "glibc defaults"), ("tuned", "tune_cpu_allocator()")):
        lines.append(f"| {label} | {statistics.median(r['step'] for r in runs[mode]):.3f} | "
                     f"{statistics.median(r['faults'] for r in runs[mode]):,.0f} |")
    lines += ["", f"tuned / default (median of the per-round ratios): {ratio:.2f}"]
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
