#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Two CPU costs of the 3D path outside the training step's grid sampling (not part of the test suite;
docs/benchmarks.md):

* **linear resizing**: :func:`monai_icon.networks.maps.resize_linear` (one matrix product per axis) against
  PyTorch's ``F.interpolate(mode="trilinear", align_corners=True)``, forward and backward of a 3-channel
  displacement field at the sizes the T1-head recipe resizes: the instance optimisation's multi-level residual
  fields (8x4x8 and 32x16x32 to 64x32x64) and a network-grid map resampled at the images' 128x64x128;
* **the network's maps at inference**: a 3D model's two U-Net steps on one pair, convolution weights in PyTorch's
  standard layout and channels-last (as :func:`monai_icon.apps.load_registration_model` loads them on CPU), the
  composed map sampled on its grid.

Every round runs every variant once, in turn (so that load drifts hit all alike); printed: medians over
``--rounds`` rounds after a warm-up round, each variant's median per-round ratio to the first of its case, and the
largest difference of its values from a float64 ``F.interpolate`` (resizing) or from the first variant (maps).

    python benchmarks/resample_bench.py [--rounds 7] [--threads 2] [--model FILE] [--output FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_icon.networks.maps import resize_linear  # noqa: E402

RESIZES = (((8, 4, 8), (64, 32, 64)), ((32, 16, 32), (64, 32, 64)), ((64, 32, 64), (128, 64, 128)))


def resize_case(source: tuple[int, ...], size: tuple[int, ...], seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """Forward + backward of both resizings of one random ``[1, 3, *source]`` field; each returns the output."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.randn(1, 3, *source, generator=generator)
    grad_out = torch.randn(1, 3, *size, generator=generator)

    def run(resize: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x = field.clone().requires_grad_()
            out = resize(x)
            out.backward(grad_out)
            return out.detach()
        return step

    reference = F.interpolate(field.double(), size=size, mode="trilinear", align_corners=True)
    return {"F.interpolate": run(lambda x: F.interpolate(x, size=size, mode="trilinear", align_corners=True)),
            "resize_linear": run(lambda x: resize_linear(x, size)), "reference": lambda: reference}


def inference_case(model_file: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """The model's map of one random pair on its grid, standard layout and channels-last weights."""
    from monai_icon.apps import load_registration_model

    standard = load_registration_model(model_file, channels_last=False).network
    channels_last = load_registration_model(model_file, channels_last=True).network
    size = load_registration_model(model_file, channels_last=False).spatial_size
    generator = torch.Generator().manual_seed(0)
    pair = torch.rand(2, 1, 1, *size, generator=generator)

    def run(network: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.inference_mode():
                phi = network(pair[0], pair[1])[0]
                return phi.grid(size)
        return step

    return {"standard": run(standard), "channels-last": run(channels_last)}


def bench(cases: dict[str, dict[str, Callable[[], torch.Tensor]]], rounds: int) -> list[dict]:
    rows = []
    for case, variants in cases.items():
        reference = variants.pop("reference", None)
        names = list(variants)
        times: dict[str, list[float]] = {n: [] for n in names}
        outputs = {n: variants[n]() for n in names}  # warm-up round; values compared
        expected = reference() if reference is not None else outputs[names[0]]
        for _ in range(rounds):
            for n in names:
                t0 = time.perf_counter()
                variants[n]()
                times[n].append(time.perf_counter() - t0)
        for n in names:
            ratios = [a / b for a, b in zip(times[n], times[names[0]])]
            rows.append({"case": case, "variant": n, "ms": 1e3 * statistics.median(times[n]),
                         "ratio": statistics.median(ratios),
                         "max_diff": float((outputs[n].double() - expected.double()).abs().max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=ROOT / "bundle/knee3d_icon/models/t1head_registration_model.pt")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {f"resize {'x'.join(map(str, a))} -> {'x'.join(map(str, b))}, fwd + bwd": resize_case(a, b)
             for a, b in RESIZES}
    cases[f"maps of {args.model.name}"] = inference_case(args.model)
    rows = bench(cases, args.rounds)
    lines = [f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
             f"medians of {args.rounds} rounds", "",
             "| case | variant | ms | / first | max. error (resizing: vs float64) |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f} | {r['max_diff']:.1e} |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
