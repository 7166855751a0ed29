# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Knee datalists (MONAI/Decathlon-style JSON) built from an OAI-like folder of image and label files.

Format (paths relative to the JSON file's folder)::

    {"description": ..., "labels": {"0": "background", "1": "femoral_cartilage", "2": "tibial_cartilage"},
     "training":   [{"image": ..., "label": ..., "side": "LEFT", "subject": "9000001"}, ...],
     "test":       [... same, other subjects ...],
     "test_pairs": [{"moving_image": ..., "moving_label": ..., "moving_side": ..., "fixed_image": ...,
                     "fixed_label": ..., "fixed_side": ..., "pair_id": ...}, ...],
     "validation": [...], "validation_pairs": [...]}      # with val_fraction > 0: subjects taken from training

Validation pairs are for choosing settings and checkpoints during training; test pairs are for reporting once.

``training`` loads with ``monai.data.load_decathlon_datalist(path, True, "training")`` and ``test_pairs`` with
:func:`~monai_icon.data.load_pair_datalist` (``key="test_pairs"``). Subjects never appear in both splits.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from monai_icon.data.synthetic_knee import KNEE_LABELS
from monai_icon.transforms.laterality import side_from_filename

__all__ = ["find_knee_files", "build_knee_datalist", "write_datalist"]


def find_knee_files(
    folder: str | Path, image_pattern: str = "*image.nii*", label_token: tuple[str, str] = ("image", "label"),
    require_side: bool = True,
) -> list[dict[str, Any]]:
    """Image files under ``folder`` (recursive ``image_pattern``) with their labels (the file name with the last
    ``label_token[0]`` replaced by ``label_token[1]``; ``None`` when absent), side (``LEFT``/``RIGHT`` in the name;
    ``None`` when absent and not ``require_side``) and subject (leading digits of the name, else the name).

    Raises:
        FileNotFoundError: the folder is missing or holds no matching image.
        ValueError: a file name carries no side.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"knee data folder not found: {folder}")
    images = sorted(p for p in folder.rglob(image_pattern) if p.is_file() and ".partial" not in p.name)
    if not images:
        raise FileNotFoundError(f"no image files matching {image_pattern!r} under {folder}")
    old, new = label_token
    records = []
    for image in images:
        side = side_from_filename(image)
        if side is None and require_side:
            raise ValueError(
                f"{image.name}: no LEFT/RIGHT in the file name; name the side or add it to the datalist by hand."
            )
        head, sep, tail = image.name.rpartition(old)
        label = image.with_name(head + new + tail) if sep else None
        subject = re.match(r"\d+", image.name)
        records.append({
            "image": str(image),
            "label": str(label) if label is not None and label.is_file() else None,
            "side": side,
            "subject": subject.group(0) if subject else image.name.split(".")[0],
        })
    return records


def build_knee_datalist(
    folder: str | Path,
    test_fraction: float = 0.2,
    num_test_pairs: int = 20,
    seed: int = 0,
    image_pattern: str = "*image.nii*",
    label_token: tuple[str, str] = ("image", "label"),
    relative_to: str | Path | None = None,
    require_side: bool = True,
    val_fraction: float = 0.0,
    num_val_pairs: int | None = None,
) -> dict[str, Any]:
    """A knee datalist (see the module docstring) from the files under ``folder``.

    Args:
        folder: OAI-like folder (see :func:`find_knee_files`).
        test_fraction: fraction of subjects held out for testing (at least one subject each side of the split).
        num_test_pairs: number of fixed test pairs (moving/fixed of different subjects when possible), drawn with
            ``seed``; pairs need labelled test images.
        relative_to: write paths relative to this folder (normally the datalist file's folder); ``None``: absolute.
        require_side: every file name must carry LEFT/RIGHT (knees); ``False`` for other anatomy.
        val_fraction: fraction of the non-test subjects held out as ``validation`` (0: none), with
            ``num_val_pairs`` labelled ``validation_pairs`` (default ``num_test_pairs``) drawn among them.

    Raises:
        ValueError: fewer than two subjects (three with a validation split), fractions out of range, or no
            labelled images for the requested pairs.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    records = find_knee_files(folder, image_pattern, label_token, require_side)
    subjects = sorted({r["subject"] for r in records})
    if len(subjects) < 2:
        raise ValueError(f"need at least two subjects to split into training and test, found {subjects}.")
    rng = np.random.default_rng(seed)
    order = [subjects[i] for i in rng.permutation(len(subjects))]
    n_test = min(len(subjects) - 1, max(1, math.ceil(test_fraction * len(subjects))))
    test_subjects = set(order[:n_test])
    rest = order[n_test:]
    n_val = 0
    if val_fraction > 0:
        if len(rest) < 2:
            raise ValueError(f"a validation split needs at least three subjects, found {len(subjects)}.")
        n_val = min(len(rest) - 1, max(1, math.ceil(val_fraction * len(rest))))
    val_subjects = set(rest[:n_val])
    training = [r for r in records if r["subject"] not in test_subjects | val_subjects]
    test = [r for r in records if r["subject"] in test_subjects]
    validation = [r for r in records if r["subject"] in val_subjects]
    pairs = _draw_pairs(test, num_test_pairs, rng, "test", label_token)
    val_pairs = _draw_pairs(validation, num_test_pairs if num_val_pairs is None else num_val_pairs, rng,
                            "validation", label_token) if n_val else []
    if relative_to is not None:
        base = Path(relative_to).resolve()

        def rel(item: dict[str, Any]) -> dict[str, Any]:
            return {k: (os.path.relpath(Path(v).resolve(), base) if k.endswith(("image", "label")) and v else v)
                    for k, v in item.items()}

        training, test, pairs = [rel(r) for r in training], [rel(r) for r in test], [rel(p) for p in pairs]
        validation, val_pairs = [rel(r) for r in validation], [rel(p) for p in val_pairs]
    datalist = {
        "description": f"knee datalist built from {Path(folder).name}: {len(training)} training images, "
                       f"{len(validation)} validation images, {len(test)} test images, {len(pairs)} test pairs "
                       f"(seed {seed})",
        "labels": {str(v): k for k, v in KNEE_LABELS.items()},
        "training": [{k: v for k, v in r.items() if v is not None} for r in training],
        "test": [{k: v for k, v in r.items() if v is not None} for r in test],
        "test_pairs": pairs,
    }
    if n_val:
        datalist["validation"] = [{k: v for k, v in r.items() if v is not None} for r in validation]
        datalist["validation_pairs"] = val_pairs
    return datalist


def _draw_pairs(records: list[dict[str, Any]], num_pairs: int, rng: np.random.Generator, split: str,
                label_token: tuple[str, str]) -> list[dict[str, Any]]:
    """``num_pairs`` labelled (moving, fixed) pairs of different subjects when possible."""
    labelled = [r for r in records if r["label"] is not None]
    pairs: list[dict[str, Any]] = []
    if num_pairs <= 0:
        return pairs
    if len(labelled) < 2:
        raise ValueError(
            f"{split} pairs need at least two labelled {split} images, found {len(labelled)} "
            f"(labels are found by replacing {label_token[0]!r} with {label_token[1]!r} in image names)."
        )
    candidates = [(i, j) for i in range(len(labelled)) for j in range(len(labelled))
                  if i != j and labelled[i]["subject"] != labelled[j]["subject"]]
    candidates = candidates or [(i, j) for i in range(len(labelled)) for j in range(len(labelled)) if i != j]
    picks = rng.choice(len(candidates), size=num_pairs, replace=num_pairs > len(candidates))
    for k in picks:
        a, b = labelled[candidates[k][0]], labelled[candidates[k][1]]
        pair = {
            "moving_image": a["image"], "moving_label": a["label"], "moving_side": a["side"],
            "fixed_image": b["image"], "fixed_label": b["label"], "fixed_side": b["side"],
            "pair_id": f"{Path(a['image']).name.split('.')[0]}_to_{Path(b['image']).name.split('.')[0]}",
        }
        pairs.append({k: v for k, v in pair.items() if v is not None})
    return pairs


def write_datalist(datalist: dict[str, Any], path: str | Path) -> Path:
    """Write a datalist as JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(datalist, indent=1))
    tmp.replace(path)
    return path
