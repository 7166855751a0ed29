#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Figure and table of ``experiments/recipe2d.py`` runs: test Dice and folds against steps and wall-clock minutes.

    python experiments/recipe2d_report.py runs/recipe2d/paper_1h.json runs/recipe2d/recipe_1h.json \\
        --labels "paper recipe" "this project's recipe" --out docs/figures/recipe2d.png

Prints a Markdown table (one row per evaluation point of each run) and writes the figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_run(path: str | Path) -> dict:
    run = json.loads(Path(path).read_text())
    if not run.get("curve"):
        raise ValueError(f"{path} holds no evaluation points.")
    return run


def table(runs: list[dict], labels: list[str]) -> str:
    lines = ["| run | step | batch | minutes | val Dice | val folds | test Dice | test folds | lambda |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run, label in zip(runs, labels):
        batch = run["args"]["batch_size"]
        for p in run["curve"]:
            lines.append(f"| {label} | {p['step']} | {batch} | {p['seconds'] / 60:.1f} | {p['val_dice']:.3f} | "
                         f"{p['val_folds']:.2f} | {p.get('test_dice', float('nan')):.3f} | "
                         f"{p.get('test_folds', float('nan')):.2f} | {p['lmbda']:.0f} |")
    return "\n".join(lines)


def figure(runs: list[dict], labels: list[str], path: str | Path, target: float | None = 0.89) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharey="row")
    for run, label in zip(runs, labels):
        curve = run["curve"]
        steps = [p["step"] * run["args"]["batch_size"] / 1000 for p in curve]  # pairs seen, thousands
        minutes = [p["seconds"] / 60 for p in curve]
        dice = [p.get("test_dice", p["val_dice"]) for p in curve]
        folds = [p.get("test_folds", p["val_folds"]) for p in curve]
        for col, x in enumerate((steps, minutes)):
            axes[0, col].plot(x, dice, marker="o", ms=3, label=label)
            axes[1, col].plot(x, folds, marker="o", ms=3, label=label)
    for col, xlabel in enumerate(("training pairs seen (steps x batch, thousands)",
                                  "training minutes (2-core CPU; one thread per run unless labelled)")):
        axes[1, col].set_xlabel(xlabel)
        if target is not None:
            axes[0, col].axhline(target, color="grey", ls="--", lw=1, label=f"paper, lambda 512: {target}")
    axes[0, 0].set_ylabel("test Dice (pixels > 0.5)")
    axes[1, 0].set_ylabel("test folds per image")
    axes[1, 0].set_yscale("symlog", linthresh=0.1)
    axes[0, 1].legend(loc="lower right", fontsize=8)
    fig.suptitle("U-Nets on MNIST fives, final lambda 512: test Dice and folds (512 test pairs; "
                 "the recipe's lambda reaches 512 at 70 % of its steps)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--out", default="docs/figures/recipe2d.png")
    args = p.parse_args(argv)
    runs = [load_run(r) for r in args.runs]
    labels = args.labels or [r["args"]["name"] for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(runs)} runs but {len(labels)} labels.")
    figure(runs, labels, args.out)
    text = table(runs, labels)
    print(text)
    return text


if __name__ == "__main__":
    main()
