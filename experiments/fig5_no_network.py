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
Reports folds (negative Jacobian cells of phi_AB), Dice and the inverse consistency error for each, and saves
the figure (warped moving image with phi_AB's grid).

    python experiments/fig5_no_network.py --out runs/fig5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from monai_icon.data import RandomPairDataset, TrianglesCirclesDataset, render_shape
from monai_icon.losses import ICONLoss, inverse_consistency
from monai_icon.metrics import count_folds, threshold_dice
from monai_icon.networks import DisplacementField
from monai_icon.networks.maps import DisplacementMap
from monai_icon.networks.nets import UNet
from monai_icon.visualize import save_figure


def the_pair(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A circle (moving) and a triangle (fixed), as in the paper's figure."""
    circle = render_shape("circle", (0.55, 0.5), 0.3, 0.0, size)
    triangle = render_shape("triangle", (0.5, 0.55), 0.35, 0.4, size)
    return torch.from_numpy(circle)[None, None], torch.from_numpy(triangle)[None, None]


def direct_optimisation(a, b, lmbda: float, epsilon: float, steps: int, lr: float):
    """Optimise the two displacement fields themselves (no network)."""
    d_ab = torch.zeros(1, 2, *a.shape[2:], requires_grad=True)
    d_ba = torch.zeros(1, 2, *a.shape[2:], requires_grad=True)
    loss = ICONLoss("mse", lmbda, epsilon=epsilon)
    optimizer = torch.optim.Adam([d_ab, d_ba], lr=lr)
    for _ in tqdm(range(steps), desc=f"direct, epsilon={epsilon}", mininterval=2.0):
        optimizer.zero_grad()
        loss(a, b, DisplacementMap(d_ab), DisplacementMap(d_ba)).loss.backward()
        optimizer.step()
    return DisplacementMap(d_ab.detach()), DisplacementMap(d_ba.detach())


def trained_unet(size: int, lmbda: float, steps: int, batch_size: int, lr: float, checkpoint: str | None):
    model = DisplacementField(UNet(2))
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k.removeprefix("block."): v for k, v in state.items()}  # a RegistrationNet's state dict
        model.load_state_dict(state)
        return model
    loss = ICONLoss("mse", lmbda)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(RandomPairDataset(TrianglesCirclesDataset(6000, size, seed=0), steps * batch_size), batch_size=batch_size)
    for batch in tqdm(loader, desc="U-Net on the population", mininterval=2.0):
        x, y = batch["moving_image"], batch["fixed_image"]
        optimizer.zero_grad()
        loss(x, y, model(x, y), model(y, x)).loss.backward()
        optimizer.step()
    return model


def summarise(name, a, b, phi_ab, phi_ba):
    shape = a.shape[2:]
    torch.manual_seed(0)
    return {
        "method": name,
        "folds": float(count_folds(phi_ab.grid(shape))[0]),
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
    p.add_argument("--epsilon", type=float, default=0.125, help="approximate inverse consistency noise, pixels (paper: 1/8)")
    p.add_argument("--direct-steps", type=int, default=2000)
    p.add_argument("--direct-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=400)
    p.add_argument("--unet-batch-size", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--unet-checkpoint", default=None, help="a trained RegistrationNet/U-Net state dict instead of training")
    p.add_argument("--out", default="runs/fig5")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    a, b = the_pair(args.image_size)
    panels = []
    for name, eps in (("direct, no noise", 0.0), (f"direct, noise {args.epsilon:g} px", args.epsilon)):
        phi_ab, phi_ba = direct_optimisation(a, b, args.lmbda, eps, args.direct_steps, args.direct_lr)
        panels.append((summarise(name, a, b, phi_ab, phi_ba), phi_ab))
    model = trained_unet(args.image_size, args.lmbda, args.unet_steps, args.unet_batch_size, args.unet_lr, args.unet_checkpoint)
    if not args.unet_checkpoint:  # keep the trained U-Net so the figure can be redrawn (--unet-checkpoint)
        torch.save(model.state_dict(), out / "unet.pt")
    model.eval()
    with torch.no_grad():
        phi_ab, phi_ba = model(a, b), model(b, a)
    panels.append((summarise("U-Net (population)", a, b, phi_ab, phi_ba), phi_ab))
    summaries = [s for s, _ in panels]
    (out / "fig5.json").write_text(json.dumps({"settings": vars(args), "results": summaries}, indent=2) + "\n")
    draw_fig5(out / "fig5.png", a, b, panels)
    for s in summaries:
        print(f"{s['method']:28s} folds {s['folds']:6.0f}  Dice {s['dice']:.3f}  inverse consistency {s['inverse_consistency']:.2e}")
    print(f"figure: {out / 'fig5.png'}")
    return summaries


if __name__ == "__main__":
    main()
