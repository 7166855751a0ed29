#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's Fig. 5: inverse consistency with and without a network, for one circle/triangle pair.

Three registrations of the same pair, all with the MSE + lambda * inverse consistency loss (lambda 2048):
(1) direct optimisation of the two displacement fields phi_AB, phi_BA (no network, no noise);
(2) the same with the approximate inverse consistency noise of Sec. 2.3 (1/8 pixel, as in the paper);
(3) a U-Net trained on the triangles & circles population and applied to the pair.
Reports folds (negative Jacobian cells of phi_AB), the spread of its Jacobian determinant, Dice and the inverse
consistency error for each, and saves the figure (warped moving image with phi_AB's grid). Fold counts of a single
pair are small numbers that move with the random off-grid points, so each direct optimisation is repeated with
``--direct-seeds`` seeds and all of them are reported.

The U-Net is trained and evaluated on test pairs by the Table 1 runner (``table1.run_setting``: progress bar,
a checkpoint every ``--epoch-steps`` steps, so an interrupted run resumes) in
``<out>/unet_population_lambda<lambda>_size<size>``; its population Dice and folds are reported beside the pair's.

    python experiments/fig5_no_network.py --out runs/fig5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from monai_icon.data import render_shape
from monai_icon.handlers import latest_checkpoint
from monai_icon.losses import ICONLoss, inverse_consistency
from monai_icon.metrics import count_folds, jacobian_determinant, threshold_dice
from monai_icon.networks import DisplacementField
from monai_icon.networks.maps import DisplacementMap
from monai_icon.networks.nets import UNet
from monai_icon.visualize import save_figure
from table1 import run_setting, write_json_atomic  # experiments/table1.py, beside this script


def the_pair(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A circle (moving) and a triangle (fixed), as in the paper's figure."""
    circle = render_shape("circle", (0.55, 0.5), 0.3, 0.0, size)
    triangle = render_shape("triangle", (0.5, 0.55), 0.35, 0.4, size)
    return torch.from_numpy(circle)[None, None], torch.from_numpy(triangle)[None, None]


def direct_optimisation(a, b, lmbda: float, epsilon: float, steps: int, lr: float, seed: int = 0):
    """Optimise the two displacement fields themselves (no network); ``seed`` draws the off-grid points and the
    noise."""
    torch.manual_seed(seed)
    d_ab = torch.zeros(1, 2, *a.shape[2:], requires_grad=True)
    d_ba = torch.zeros(1, 2, *a.shape[2:], requires_grad=True)
    loss = ICONLoss("mse", lmbda, epsilon=epsilon)
    optimizer = torch.optim.Adam([d_ab, d_ba], lr=lr)
    for _ in tqdm(range(steps), desc=f"direct, epsilon={epsilon}, seed {seed}", mininterval=2.0):
        optimizer.zero_grad()
        loss(a, b, DisplacementMap(d_ab), DisplacementMap(d_ba)).loss.backward()
        optimizer.step()
    return DisplacementMap(d_ab.detach()), DisplacementMap(d_ba.detach())


def trained_unet(args: argparse.Namespace, out: Path) -> tuple[torch.nn.Module, dict | None]:
    """The population U-Net: ``--unet-checkpoint`` if given, otherwise trained (or resumed, or reused when
    finished) by the Table 1 runner. Returns the block (maps in, maps out) and the runner's result dict."""
    result = None
    checkpoint = args.unet_checkpoint
    if not checkpoint:
        config = {
            "dataset": "triangles", "network": "unet", "lmbda": args.lmbda, "similarity": "mse",
            "image_size": args.image_size, "lr": args.unet_lr, "batch_size": args.unet_batch_size,
            "steps": args.unet_steps, "test_pairs": args.unet_test_pairs, "seed": 0,
        }
        run_dir = out / f"unet_population_lambda{args.lmbda:g}_size{args.image_size}"
        result = run_setting(config, run_dir, torch.device(args.device), args.epoch_steps, mnist_path=None)
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("network", state)  # a runner/trainer checkpoint or a bare state dict
    network = DisplacementField(UNet(2))
    network.load_state_dict({k.removeprefix("block."): v for k, v in state.items()})  # RegistrationNet keys
    return network, result


def jacobian_std(phi, shape) -> float:
    """Spread of phi's Jacobian determinant over the cells, in voxel units (0 for the identity or a translation):
    a regularity measure that, unlike the fold count, also sees cells that are squeezed without folding."""
    grid = phi.grid(shape)
    grid = grid * torch.tensor([n - 1 for n in shape], dtype=grid.dtype, device=grid.device).reshape(1, -1, 1, 1)
    return float(jacobian_determinant(grid).std())


def summarise(name, a, b, phi_ab, phi_ba):
    shape = a.shape[2:]
    torch.manual_seed(0)
    return {
        "method": name,
        "folds": float(count_folds(phi_ab.grid(shape))[0]),
        "jacobian_std": jacobian_std(phi_ab, shape),
        "dice": float(threshold_dice(phi_ab.warp(a), b)[0]),
        "inverse_consistency": float(inverse_consistency(phi_ab, phi_ba, shape)[0]),
    }


def draw_fig5(path: Path, a, b, panels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 + len(panels), figsize=(3.2 * (2 + len(panels)), 3.9))
    for ax, (title, image) in zip(axes[:2], (("moving (circle)", a), ("fixed (triangle)", b))):
        ax.imshow(image[0, 0], cmap="gray")
        ax.set_title(title)
    levels = torch.linspace(0, 1, 24).numpy()
    for ax, (summary, phi) in zip(axes[2:], panels):
        shape = a.shape[2:]
        grid = phi.grid(shape)[0].detach()
        ax.imshow(phi.warp(a)[0, 0].detach(), cmap="gray")
        ax.contour(grid[0], levels=levels, colors="r", linewidths=0.5)
        ax.contour(grid[1], levels=levels, colors="r", linewidths=0.5)
        ax.set_title(f"{summary['method']}\nfolds {summary['folds']:.0f}, Dice {summary['dice']:.2f}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lmbda", type=float, default=2048.0)
    p.add_argument(
        "--epsilon", type=float, default=0.125, help="approximate inverse consistency noise, pixels (paper: 1/8)"
    )
    p.add_argument("--direct-steps", type=int, default=2000)
    p.add_argument("--direct-lr", type=float, default=1e-3)
    p.add_argument("--direct-seeds", type=int, default=5,
                   help="repeat each direct optimisation with this many seeds (the figure shows seed 0)")
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--unet-batch-size", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument(
        "--unet-test-pairs", type=int, default=512, help="test pairs for the U-Net's population Dice and folds"
    )
    p.add_argument("--unet-checkpoint", default=None,
                   help="a trained U-Net instead of training one: a runner checkpoint or a RegistrationNet state dict")
    p.add_argument("--epoch-steps", type=int, default=50, help="U-Net steps between checkpoints")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the U-Net's training")
    p.add_argument("--out", default="runs/fig5")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.direct_seeds < 1:
        raise ValueError(f"--direct-seeds must be at least 1, got {args.direct_seeds}.")
    a, b = the_pair(args.image_size)
    panels = []
    for name, eps in (("direct, no noise", 0.0), (f"direct, noise {args.epsilon:g} px", args.epsilon)):
        runs = []
        for seed in range(args.direct_seeds):
            phi_ab, phi_ba = direct_optimisation(a, b, args.lmbda, eps, args.direct_steps, args.direct_lr, seed)
            runs.append((summarise(name, a, b, phi_ab, phi_ba), phi_ab))
        summary = dict(runs[0][0], seeds=[s for s, _ in runs])
        phi_ab = runs[0][1]
        panels.append((summary, phi_ab))
    torch.manual_seed(0)
    model, population = trained_unet(args, out)
    model.eval()
    with torch.no_grad():
        phi_ab, phi_ba = model(a, b), model(b, a)
    panels.append((summarise("U-Net (population)", a, b, phi_ab, phi_ba), phi_ab))
    summaries = [s for s, _ in panels]
    saved = {"settings": vars(args), "results": summaries, "unet_population": population}
    write_json_atomic(out / "fig5.json", saved)
    draw_fig5(out / "fig5.png", a, b, panels)
    for s in summaries:
        print(f"{s['method']:28s} folds {s['folds']:6.0f}  Jacobian std {s['jacobian_std']:.3f}  Dice {s['dice']:.3f}  "
              f"inverse consistency {s['inverse_consistency']:.2e}")
        if len(s.get("seeds", [])) > 1:
            folds = sorted(r["folds"] for r in s["seeds"])
            spread = sorted(r["jacobian_std"] for r in s["seeds"])
            print(
                f"{'':28s} over {len(folds)} seeds: folds {folds[0]:.0f}..{folds[-1]:.0f} "
                f"(median {folds[len(folds) // 2]:.0f}), "
                f"Jacobian std {spread[0]:.3f}..{spread[-1]:.3f}"
            )
    if population is not None:
        print(f"U-Net on {population['test_pairs']} test pairs of the population: Dice {population['dice']:.3f}  "
              f"folds {population['folds']:.2f} per image (unregistered Dice {population['dice_unregistered']:.3f})")
    print(f"figure: {out / 'fig5.png'}")
    return summaries


if __name__ == "__main__":
    main()
