# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Human-readable summaries of a run (printed at the end of the bundle's train and evaluate configs)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["evaluation_title", "format_summary", "print_summary"]

_NAMES = {
    "dice": "Dice (pixels > 0.5)",
    "dice_unregistered": "Dice before registration",
    "folds": "folds per image (negative Jacobian cells of phi_AB)",
    "folds_percent": "folds, % of cells",
    "similarity": "similarity (symmetric)",
    "label_dice": "label Dice (mean over labels)",
    "label_dice_unregistered": "label Dice before registration",
    "dice_femoral_cartilage": "Dice, femoral cartilage",
    "dice_tibial_cartilage": "Dice, tibial cartilage",
    "time": "seconds per pair",
}


def format_summary(
    metrics: Mapping[str, Any],
    model_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    title: str = "ICON",
) -> str:
    """Format metric values (e.g. ``evaluator.state.metrics``) and where the model and figures are."""
    lines = [f"== {title} =="]
    if not metrics:
        lines.append("no evaluation ran in this call (training already complete? evaluate with evaluate.yaml)")
    for key, value in metrics.items():
        short = key.split("_", 1)[1] if key.startswith(("val_", "test_")) else key
        label = _NAMES.get(short, key)
        try:
            lines.append(f"{label}: {float(value):.4f}")
        except (TypeError, ValueError):
            lines.append(f"{label}: {value}")
    if model_dir is not None:
        models = sorted(p.name for p in Path(model_dir).glob("*.pt"))
        lines.append(f"models in {model_dir}: {', '.join(models) if models else 'none'}")
    if output_dir is not None:
        figures = sorted(Path(output_dir).glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
        lines.append(
            f"figures in {output_dir}: {len(figures)} PNG" + (f" (newest {figures[-1].name})" if figures else "")
        )
    return "\n".join(lines)


def print_summary(
    engine: Any,
    model_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    title: str = "ICON",
    loss: Any = None,
    enabled: bool = True,
) -> str:
    """Print (when ``enabled``: rank 0 of several processes) and return :func:`format_summary` of ``engine``'s
    metrics (``engine.state.metrics``); with a ``loss``, its current lambda is appended to the title as
    ``(lambda now 1.23)``. The bundles call it at the end of their ``run`` list."""
    if loss is not None:
        title = f"{title} (lambda now {float(loss.lmbda):.2f})"
    text = format_summary(engine.state.metrics, model_dir, output_dir, title)
    if enabled:
        print(text)
    return text


def evaluation_title(model_file: str | Path, pairs: int, io_steps: int | str = 0) -> str:
    """``"ICON evaluation of <model_file> on <pairs> test pairs"``, with ``", instance optimisation <n> steps"``
    when ``io_steps`` is not zero."""
    title = f"ICON evaluation of {model_file} on {pairs} test pairs"
    return title + (f", instance optimisation {io_steps} steps" if int(io_steps) else "")
