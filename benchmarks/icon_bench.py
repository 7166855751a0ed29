#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Benchmarks of an ICON training step against the network's own cost (not part of the test suite).

For each case it reports, as medians over ``--repeats`` runs after ``--warmup`` runs:

* ``step``: one training step (both directions, ICON loss, backward, Adam step), as ``ICONTrainer`` runs it;
* ``bare``: the floor, the registration networks' own forward + backward on both directions (same inputs,
  a trivial loss, same optimiser step), without maps, warping or the inverse consistency evaluation;
* ``overhead``: step / bare, the median of per-round ratios with step and bare runs alternated (target <= 1.15);
* ``infer``: inference per pair (``torch.inference_mode``; map on the fixed grid + warped moving image);
* peak memory of a step and of the bare passes, each measured in a fresh process: the peak of live tensor
  storages above the set-up (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the same quantity counted by
  :class:`TensorMemoryPeak`) and, on CPU, also the peak RSS above the set-up (which adds the C allocator's
  retention and the libraries' own buffers, and varies from run to run);
* step time against the number of voxels (fitted exponent, target <= 1.1).

    python benchmarks/icon_bench.py                      # everything, writes docs/benchmarks.md
    python benchmarks/icon_bench.py --quick              # fewer repeats, small scaling ladder
    python benchmarks/icon_bench.py --variants           # torch.compile / channels_last against eager
    python benchmarks/icon_bench.py --paper-sizes        # 192x192x80 (the paper's OAI size), both training stages,
                                                         # batch as large as fits
    python benchmarks/icon_bench.py --similarity-loop    # MSE and LNCC overheads from one alternating loop
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField, Downsample, Frozen, TwoStep
from monai_icon.networks.nets import UNet


@dataclass
class Case:
    name: str
    spatial_dims: int
    shape: tuple[int, ...]
    batch: int
    similarity: str = "mse"
    stage: int = 1  # 3D: 1 = the two-step model at half resolution; 2 = that model frozen + a full-resolution U-Net

    def __post_init__(self) -> None:
        if self.stage not in (1, 2) or (self.stage == 2 and self.spatial_dims != 3):
            raise ValueError(f"stage must be 1, or 2 for a 3D case; got stage {self.stage} in {self.spatial_dims}D.")

    @property
    def two_step_half(self) -> bool:  # the paper's 3D recipe: two U-Nets composed at half resolution
        return self.spatial_dims == 3


# the benchmark's sizes: 2D 128x128 batch 32; 3D 96x96x40 batch 1 with the paper's two-step model at half resolution
CASES = [
    Case("2D U-Net 128x128, batch 32", 2, (128, 128), 32, "mse"),
    Case("2D U-Net 128x128, batch 32", 2, (128, 128), 32, "lncc"),
    Case("3D two-step 1/2 res. 96x96x40, batch 1", 3, (96, 96, 40), 1, "mse"),
    Case("3D two-step 1/2 res. 96x96x40, batch 1", 3, (96, 96, 40), 1, "lncc"),
]


def build(case: Case, device: torch.device):
    """The case's model, its U-Nets (frozen ones included), loss, optimiser (of the trained parameters) and a pair.

    Models: 2D one U-Net step; 3D stage 1 two U-Net steps composed at half resolution (the paper's first training
    stage); 3D stage 2 that model frozen (:class:`~monai_icon.networks.Frozen`) and a full-resolution U-Net step
    composed after it (the paper's second stage)."""
    torch.manual_seed(0)
    nets = [UNet(case.spatial_dims) for _ in range(1 if case.spatial_dims == 2 else 1 + case.stage)]
    with torch.no_grad():  # a non-trivial map, as after some training
        for net in nets:
            net.out.weight.normal_(0, 1e-3)
    if case.two_step_half:
        model = Downsample(TwoStep(DisplacementField(nets[0]), DisplacementField(nets[1])))
        if case.stage == 2:
            model = TwoStep(Frozen(model), DisplacementField(nets[2]))
    else:
        model = DisplacementField(nets[0])
    model = model.to(device)
    loss = ICONLoss(case.similarity, 512.0, spatial_dims=case.spatial_dims).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    a = torch.rand(case.batch, 1, *case.shape, device=device)
    b = torch.rand(case.batch, 1, *case.shape, device=device)
    return model, nets, loss, optimizer, a, b


def make_step(case: Case, device: torch.device, built: tuple | None = None):
    """``step``, ``bare`` and ``infer`` closures for ``case`` (see the module docstring), on ``built`` (the result
    of :func:`build`) or on a fresh build."""
    model, nets, loss, optimizer, a, b = built if built is not None else build(case, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = loss(a, b, model(a, b), model(b, a))
        out.loss.backward()
        optimizer.step()

    pool = F.avg_pool3d if case.spatial_dims == 3 else F.avg_pool2d
    # stage 2: the frozen half-resolution U-Nets run forward only, the full-resolution one (the last) trains
    trains = [any(p.requires_grad for p in net.parameters()) for net in nets]
    full_resolution = [case.stage == 2 and i == 2 for i in range(len(nets))]

    def bare():
        optimizer.zero_grad(set_to_none=True)
        half = (pool(a, 2, ceil_mode=True), pool(b, 2, ceil_mode=True)) if case.two_step_half else (a, b)
        total = 0.0
        for net, train, full in zip(nets, trains, full_resolution):
            x, y = (a, b) if full else half
            with torch.set_grad_enabled(train):
                both = net(x, y).square().mean() + net(y, x).square().mean()
            if train:
                total = total + both
        total.backward()
        optimizer.step()

    def infer():
        with torch.inference_mode():
            phi = model(a, b)
            phi.warp(a)

    return step, bare, infer


VARIANTS = ("eager", "compile-loss", "compile-all", "channels-last", "amp")


def make_variant_step(case: Case, device: torch.device, variant: str):
    """A training step as in :func:`make_step`, run as ``variant``:

    * ``eager``: as is; ``compile-loss``: ``torch.compile`` of the ICON loss (maps, warps, similarity, inverse
      consistency, folds); ``compile-all``: the U-Nets compiled too; ``channels-last``: U-Net weights and images
      in ``torch.channels_last`` (2D) / ``channels_last_3d`` (3D) memory format; ``amp``: mixed precision as
      ``ICONTrainer(amp=True)`` runs it (``torch.autocast``: float16 and a ``GradScaler`` on CUDA, bfloat16 on
      CPU, where the trainer does not offer it; the ICON loss itself stays float32).

    Returns ``step(seed) -> loss value``; the seed fixes the inverse consistency jitter.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}.")
    model, nets, loss, optimizer, a, b = build(case, device)
    if variant == "channels-last":
        fmt = torch.channels_last_3d if case.spatial_dims == 3 else torch.channels_last
        for net in nets:
            net.to(memory_format=fmt)
        a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
    if variant.startswith("compile"):
        loss.compile()
        if variant == "compile-all":
            for net in nets:
                net.compile()

    amp = variant == "amp"
    scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None
    half = torch.float16 if device.type == "cuda" else torch.bfloat16

    def step(seed: int) -> float:
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=half, enabled=amp):
            out = loss(a, b, model(a, b), model(b, a))
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out.loss.backward()
            optimizer.step()
        return float(out.loss)

    return step


PAPER_SHAPE = (192, 192, 80)  # the paper's OAI knee images


def fits(case: Case, device: torch.device) -> bool:
    """Whether one training step of ``case`` runs on ``device`` without running out of memory."""
    try:
        step, _, _ = make_step(case, device)
        step()
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(case: Case, device: torch.device, max_batch: int) -> int:
    """The largest power-of-two batch (up to ``max_batch``) whose training step fits; 0 if batch 1 does not."""
    batch, candidate = 0, 1
    while candidate <= max_batch and fits(replace(case, batch=candidate), device):
        batch, candidate = candidate, 2 * candidate
    return batch


def paper_size_row(case: Case, args, warmup: int, repeats: int) -> str:
    """One row of :func:`run_paper_sizes`: ``case`` at the largest batch that fits."""
    device = torch.device(args.device)
    batch = largest_batch(case, device, args.max_batch)
    if batch == 0:
        return f"| {case.name} | {case.similarity} | batch 1 does not fit | | | | | | |"
    t_step, t_bare, ratio, t_infer, mem = measure_case(
        replace(case, batch=batch), device, warmup, repeats, not args.no_memory
    )
    return (
        f"| {case.name} | {case.similarity} | {batch} | {t_step:.3f} | {t_bare:.3f} | {ratio:.2f} | "
        f"{t_step / batch:.4f} | {t_infer:.4f} | {mem} |"
    )


def run_paper_sizes(args) -> str:
    """The main report's columns at the paper's full 3D size for its two training stages (``--stages``: 1, the
    two-step model at half resolution; 2, that model frozen and a full-resolution U-Net step composed after it),
    with the largest power-of-two batch that fits (``--max-batch``)."""
    device = torch.device(args.device)
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    shape = tuple(args.shape) if args.shape else PAPER_SHAPE
    lines = [
        "| case | similarity | batch | step [s] | bare nets [s] | overhead | step / pair [s] | inference / pair [s] "
        "| peak memory step / bare: tensors (RSS) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    size = "x".join(map(str, shape))
    names = {1: f"3D two-step 1/2 res. {size}", 2: f"3D stage 2: frozen two-step 1/2 res. + full-res. U-Net {size}"}
    for stage in args.stages:
        for similarity in ("mse", "lncc"):
            lines.append(paper_size_row(Case(names[stage], 3, shape, 1, similarity, stage), args, warmup, repeats))
            print(lines[-1], flush=True)
    return "\n".join(
        [f"Machine: {machine()}; device {device}. Medians of {repeats} runs after {warmup} warm-up run(s); "
         f"batch: the largest power of two up to {args.max_batch} that fits.", "", *lines]
    )


def similarity_loop_overheads(case: Case, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Overheads of ``case`` with MSE and with LNCC from one loop that runs, each round, the bare passes, an MSE
    step, an LNCC step and the bare passes again; each step is divided by the mean of the two bare runs around it
    (so that drifts of the machine's speed within a round cancel). Returns the median ratio per similarity."""
    step_mse, bare, _ = make_step(replace(case, similarity="mse"), device)
    step_lncc, _, _ = make_step(replace(case, similarity="lncc"), device)
    rounds = round_times([bare, step_mse, step_lncc, bare], device, warmup, repeats)
    floors = [(r[0] + r[3]) / 2 for r in rounds]
    return {
        "mse": statistics.median(r[1] / f for r, f in zip(rounds, floors)),
        "lncc": statistics.median(r[2] / f for r, f in zip(rounds, floors)),
    }


def run_similarity_loop(args) -> str:
    device = torch.device(args.device)
    warmup, repeats = (1, 5) if args.quick else (args.warmup, max(args.repeats, 15))
    lines = ["| case | rounds | overhead MSE | overhead LNCC |", "|---|---|---|---|"]
    for case in CASES:
        if case.similarity != "mse":  # one row per case shape
            continue
        result = similarity_loop_overheads(case, device, warmup, repeats)
        lines.append(f"| {case.name} | {repeats} | {result['mse']:.2f} | {result['lncc']:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join([f"Machine: {machine()}; device {device}. Medians over the rounds.", "", *lines])


def run_variants(args) -> str:
    """Step time of each variant against eager (alternated, medians), first-call (compile) time, and the loss of
    the first step next to eager's (same weights, data and jitter seed; ``fallback_random`` makes compiled
    random numbers equal to eager ones for that comparison)."""
    import torch._inductor.config as inductor_config

    device = torch.device(args.device)
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    inductor_config.fallback_random = True
    lines = [
        "| case | similarity | variant | first step [s] | step [s] | eager step [s] | variant / eager | loss (eager) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        for variant in args.variants:
            if variant == "eager":
                continue
            torch._dynamo.reset()
            other = make_variant_step(case, device, variant)
            start = time.perf_counter()
            try:
                loss_variant = other(0)
            except Exception as e:  # e.g. an inductor code-generation error: report it, go on
                reason = str(e).strip().splitlines()[0][:80] if str(e).strip() else ""
                lines.append(
                    f"| {case.name} | {case.similarity} | {variant} | failed: {type(e).__name__} {reason} | | | | |"
                )
                print(lines[-1], flush=True)
                continue
            sync(device)
            first = time.perf_counter() - start
            eager = make_variant_step(case, device, "eager")  # same initial weights as ``other``
            loss_eager = eager(0)
            seeds = iter(range(1, 10_000))
            t_variant, t_eager, ratio = interleaved_times(
                lambda: other(next(seeds)), lambda: eager(next(seeds)), device, warmup, repeats
            )
            lines.append(
                f"| {case.name} | {case.similarity} | {variant} | {first:.1f} | {t_variant:.3f} | {t_eager:.3f} | "
                f"{ratio:.2f} | {loss_variant:.6f} ({loss_eager:.6f}) |"
            )
            print(lines[-1], flush=True)
    return "\n".join(
        [f"Machine: {machine()}; device {device}. Medians of {repeats} runs after {warmup} warm-up run(s).", "", *lines]
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_times(fns, device: torch.device, warmup: int, repeats: int) -> list[list[float]]:
    """Run ``fns`` in turn, ``warmup`` rounds untimed then ``repeats`` timed rounds (so that machine load drifts hit
    all of them alike); returns the seconds of every call, one list per round in the order of ``fns``."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    rounds = []
    for _ in range(repeats):
        times = []
        for fn in fns:
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        rounds.append(times)
    return rounds


def median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    return statistics.median(t for (t,) in round_times([fn], device, warmup, repeats))


def interleaved_times(first, second, device: torch.device, warmup: int, repeats: int) -> tuple[float, float, float]:
    """Alternate ``first`` and ``second``; return their median times and the median of the per-round ratios
    ``first / second``."""
    rounds = round_times([first, second], device, warmup, repeats)
    t1, t2 = [r[0] for r in rounds], [r[1] for r in rounds]
    return statistics.median(t1), statistics.median(t2), statistics.median(a / b for a, b in zip(t1, t2))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image (Linux ``VmHWM``; ``ru_maxrss`` would include the parent's
    peak, which a forked child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("peak memory needs Linux /proc/self/status (VmHWM)")


class TensorMemoryPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the context and alive at the same time: on CPU what
    ``torch.cuda.max_memory_allocated`` measures on CUDA (above the memory allocated before the context).

    Every operation's outputs are recorded once per storage, unless they alias one of its inputs (views and
    in-place updates of existing tensors); a storage counts until it is freed. Buffers that an operation allocates
    and frees internally are not seen. (``torch.distributed._tools.mem_tracker.MemTracker`` measures the same but
    refuses modules that run more than once per iteration, as the registration networks do: A->B and B->A.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._alive:
                continue
            self._alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


MEMORY_KINDS = ("tensors", "rss")


def memory_probe(case: Case, which: str, device: torch.device, kind: str = "tensors") -> int:
    """Peak memory of two calls of ``which`` (step | bare) above the set-up, in bytes (run in a fresh process):
    ``kind`` ``"tensors"`` (live tensor storages) or ``"rss"`` (CPU only: the process's peak resident memory)."""
    step, bare, _ = make_step(case, device)
    fn = step if which == "step" else bare
    if kind == "rss":
        if device.type != "cpu":
            raise ValueError("peak RSS is measured on CPU only.")
        base = peak_rss_bytes()
        fn()
        fn()
        return peak_rss_bytes() - base
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorMemoryPeak() as tracker:
        fn()
        fn()
    return tracker.peak


def measure_memory(case: Case, which: str, device: torch.device, kind: str = "tensors") -> int:
    spec = json.dumps(case.__dict__ | {"shape": list(case.shape)})
    args = [sys.executable, __file__, "--probe", spec, which, str(device), kind]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory_cell(case: Case, device: torch.device) -> str:
    """``step / bare MiB = ratio`` of the tensor peaks, followed on CPU by the same for the peak RSS."""
    cells = []
    for kind in MEMORY_KINDS if device.type == "cpu" else MEMORY_KINDS[:1]:
        m_step, m_bare = measure_memory(case, "step", device, kind), measure_memory(case, "bare", device, kind)
        cell = f"{m_step / 2**20:.0f} / {m_bare / 2**20:.0f} MiB = {m_step / max(m_bare, 1):.2f}"
        cells.append(cell if kind == "tensors" else f"(RSS {cell})")
    return " ".join(cells)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), GPU {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def measure_case(case: Case, device: torch.device, warmup: int, repeats: int, memory: bool):
    """Step and bare times with their ratio (alternated), inference time per pair, and (``memory``) the peak
    memory of a step and of the bare passes as a table cell ("" otherwise)."""
    step, bare, infer = make_step(case, device)
    t_step, t_bare, ratio = interleaved_times(step, bare, device, warmup, repeats)
    t_infer = median_time(infer, device, warmup, repeats) / case.batch
    del step, bare, infer
    mem = memory_cell(case, device) if memory else ""
    return t_step, t_bare, ratio, t_infer, mem


def run(args) -> str:
    device = torch.device(args.device)
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    lines = [
        "| case | similarity | step [s] | bare nets [s] | overhead | inference / pair [s] "
        "| peak memory step / bare: tensors (RSS) |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        t_step, t_bare, ratio, t_infer, mem = measure_case(case, device, warmup, repeats, not args.no_memory)
        lines.append(
            f"| {case.name} | {case.similarity} | {t_step:.3f} | {t_bare:.3f} | {ratio:.2f} | {t_infer:.4f} | {mem} |"
        )
        print(lines[-1], flush=True)

    ladders = {
        2: [(64, 64), (128, 128)] + ([] if args.quick else [(256, 256)]),
        # full-resolution sizes that are multiples of 64 (the half-resolution U-Nets pad to multiples of 32),
        # large enough for batch norm at the coarsest level with batch 1
        3: [(128, 64, 64), (128, 128, 64)] + ([] if args.quick else [(128, 128, 128)]),
    }
    scale_lines = ["| dims | size | voxels | step [s] |", "|---|---|---|---|"]
    exponents = []
    for dims, sizes in ladders.items():
        xs, ys = [], []
        for size in sizes:
            case = Case("scaling", dims, size, 8 if dims == 2 else 1)
            step, _, _ = make_step(case, device)
            t = median_time(step, device, warmup, repeats)
            voxels = math.prod(size)
            xs.append(math.log(voxels))
            ys.append(math.log(t))
            scale_lines.append(f"| {dims}D | {'x'.join(map(str, size))} | {voxels} | {t:.3f} |")
            print(scale_lines[-1], flush=True)
        slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
        exponents.append(f"{dims}D: time ~ voxels^{slope:.2f} (from {sizes[0]} to {sizes[-1]})")
    return "\n".join(
        [
            f"Machine: {machine()}; device {device}. Medians of {repeats} runs after {warmup} warm-up run(s); "
            "overhead = median of step/bare ratios with the two alternated.",
            "",
            *lines,
            "",
            "Step time against image size (2D batch 8, 3D batch 1; MSE):",
            "",
            *scale_lines,
            "",
            "; ".join(exponents),
        ]
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        spec = json.loads(sys.argv[2])
        spec["shape"] = tuple(spec["shape"])
        print(memory_probe(Case(**spec), sys.argv[3], torch.device(sys.argv[4]), sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--output", default=None, help="write the markdown table to this file")
    p.add_argument(
        "--variants", nargs="*", choices=VARIANTS, default=None,
        help="instead of the main report, time these variants of the training step against eager "
        "(torch.compile, channels_last); no variant given: all",
    )
    p.add_argument("--similarity-loop", action="store_true",
                   help="instead of the main report, MSE and LNCC overheads from one alternating loop (>= 15 rounds)")
    p.add_argument("--paper-sizes", action="store_true",
                   help="instead of the main report, the paper's 3D size with the largest batch that fits")
    p.add_argument("--max-batch", type=int, default=None,
                   help="--paper-sizes: largest batch tried (default 64 on CUDA, which reports running out of memory; "
                   "1 on CPU, where running out of memory kills the process)")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="--paper-sizes: another 3D shape (testing)")
    p.add_argument("--stages", type=int, nargs="+", choices=(1, 2), default=[1, 2],
                   help="--paper-sizes: the paper's training stages to measure (default both)")
    args = p.parse_args()
    if args.variants is not None and not args.variants:
        args.variants = list(VARIANTS)
    if args.max_batch is None:
        args.max_batch = 64 if torch.device(args.device).type == "cuda" else 1
    if args.paper_sizes:
        report = run_paper_sizes(args)
    elif args.variants is not None:
        report = run_variants(args)
    elif args.similarity_loop:
        report = run_similarity_loop(args)
    else:
        report = run(args)
    print(report)
    if args.output:
        Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
