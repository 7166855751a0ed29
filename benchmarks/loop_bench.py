#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Seconds per iteration of the T1-head demo's real training loop under several settings (not part of the test
suite; docs/benchmarks.md).

Each measurement is its own process running the bundle's own trainer (``bundle/knee3d_icon/configs``: common +
stage 1, the settings of ``scripts/run_knee3d_demo.sh`` with ``DATA=real``: images 128x64x128, two U-Net steps on
2x pooled inputs, three-scale LNCC, GradICON on 64x32x64, augmentation, channels-last, ``--cpu_amp auto``, the
tuned allocator, batch 2) for ``--iterations`` iterations without validation; the first ``--skip`` iterations are
left out, the rest timed from one iteration's end to the next. Rounds alternate the variants so that load drifts
hit all alike. Printed: each variant's median over rounds of its per-process median, and the median over rounds of
its ratio to the first variant in the same round.

A variant is ``NAME=JSON`` (bundle overrides, e.g. ``'gradicon-quarter={"ic_point_fraction": 0.25}'``) or
``NAME@SOURCE=JSON`` to import ``monai_icon`` from another checkout (e.g. a ``git worktree`` of an earlier commit,
to time code changes that have no switch). ``--datalist`` must point at a demo datalist (``runs/.../datalist.json``,
written by the demo script).

    python benchmarks/loop_bench.py --datalist runs/t1head_demo/datalist.json \\
        'base={}' 'quarter={"ic_point_fraction": 0.25}' [--rounds 3] [--iterations 14] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the demo's DATA=real recipe (scripts/run_knee3d_demo.sh, VARIANT=fine), validation off
DEMO = {
    "full_size": [128, 64, 128], "batch_size": 2, "epochs": 1, "target_side": None, "axcodes": "RAS",
    "num_classes": 7, "label_names": {i: f"class{i}" for i in range(1, 7)}, "val_pairs": 6,
    "learning_rate": 0.0005, "lr_schedule": "cosine", "warmup_steps": 100, "max_grad_norm": 5,
    "lmbda_schedule": "continuation", "lmbda_start": 1, "lmbda_target": 4, "lmbda_ramp": 0.5,
    "augment_deform": 3.0, "augment_gamma": 1.25, "image_size": [128, 64, 128], "coarse_factor": 2,
    "regularizer_size": [64, 32, 64], "similarity": "lncc", "lncc_kernel": 5, "regularizer": "gradicon",
    "similarity_scales": [1, 2, 4], "val_interval": 1000, "cpu_amp": "auto", "resume": False,
    "architecture#encoder_channels": [16, 32, 64, 64, 64], "architecture#decoder_channels": [64, 64, 32, 16, 16],
    "architecture#resample_coarse": True,
}

_CHILD = """
import json, sys, time
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
settings = json.loads(sys.argv[1])
torch.set_num_threads(settings.pop("threads"))
configs = settings.pop("configs")
parser = ConfigParser()
parser.read_config(configs)
for key, value in settings.items():
    parser[key] = value
parser.get_parsed_content("initialize")
trainer = parser.get_parsed_content("train#trainer")
ends = []
trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: ends.append(time.perf_counter()))
trainer.run()
import monai_icon
print("RESULT " + json.dumps({"ends": ends, "module": monai_icon.__file__}))
"""


def parse_variant(text: str) -> tuple[str, str | None, dict]:
    """``NAME[@SOURCE]=JSON`` -> (name, source checkout or None, overrides)."""
    head, sep, body = text.partition("=")
    if not sep:
        raise ValueError(f"a variant is NAME=JSON or NAME@SOURCE=JSON, got {text!r}.")
    name, _, source = head.partition("@")
    overrides = json.loads(body)
    if not isinstance(overrides, dict):
        raise ValueError(f"the overrides of {name!r} must be a JSON object, got {body!r}.")
    return name, source or None, overrides


def measure(source: str | None, overrides: dict, datalist: str, iterations: int, threads: int, skip: int) -> dict:
    """One process: median seconds per iteration after ``skip`` iterations."""
    code_root = Path(source).resolve() if source else ROOT
    configs = [str(code_root / "bundle/knee3d_icon/configs" / name) for name in ("common.yaml", "stage1.yaml")]
    with tempfile.TemporaryDirectory() as out:
        settings = {**DEMO, "datalist": str(Path(datalist).resolve()), "output_root": out,
                    "iterations_per_epoch": iterations, **overrides, "threads": threads, "configs": configs}
        env = dict(os.environ, PYTHONPATH=str(code_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(settings)], capture_output=True, text=True,
                              check=False, env=env, cwd=str(code_root))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"the measurement failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    ends = result["ends"]
    gaps = [b - a for a, b in zip(ends[skip:], ends[skip + 1:])]
    if not gaps:
        raise RuntimeError(f"no timed iterations: raise --iterations above --skip + 1 ({len(ends)} ran).")
    return {"seconds_per_iteration": statistics.median(gaps), "module": result["module"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="NAME=JSON or NAME@SOURCE=JSON (the first is the reference)")
    p.add_argument("--datalist", required=True, help="a demo datalist (runs/.../datalist.json)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=14, help="iterations per process")
    p.add_argument("--skip", type=int, default=3, help="first iterations left out (warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="also write the markdown table to this file")
    args = p.parse_args()
    if not Path(args.datalist).is_file():
        raise SystemExit(f"no datalist at {args.datalist}: run the demo (DATA=real) first.")
    variants = [parse_variant(v) for v in args.variants]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    modules: dict[str, str] = {}
    for round_index in range(args.rounds):
        for name, source, overrides in variants:
            got = measure(source, overrides, args.datalist, args.iterations, args.threads, args.skip)
            times[name].append(got["seconds_per_iteration"])
            modules[name] = got["module"]
            print(f"round {round_index + 1}: {name} {got['seconds_per_iteration']:.3f} s/it", flush=True)
        reference = times[variants[0][0]][-1]
        for name, _, _ in variants:
            ratios[name].append(times[name][-1] / reference)
    lines = [f"Demo training loop, {args.threads} threads, {platform.processor() or platform.machine()}, "
             f"torch {__import__('torch').__version__}; {args.rounds} rounds of {args.iterations} iterations "
             f"(first {args.skip} left out)", "",
             "| variant | overrides | s / iteration (median) | ratio to the first (median) |", "|---|---|---|---|"]
    for name, source, overrides in variants:
        where = f" ({source})" if source else ""
        lines.append(f"| {name}{where} | `{json.dumps(overrides)}` | {statistics.median(times[name]):.3f} | "
                     f"{statistics.median(ratios[name]):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
