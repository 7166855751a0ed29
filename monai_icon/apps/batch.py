# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Registering a list of pairs (``monai-icon register-pairs``): checks of the whole list first, outputs per pair,
label Dice before and after on each fixed grid, per-pair seeds and resumable summaries."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_icon.apps.atomic_io import write_text
from monai_icon.apps.files import REFINEMENT_KEYWORDS, OutputFiles, PairFiles, refinement_from_keywords, split_keywords
from monai_icon.apps.model_files import RegistrationModel, load_registration_model
from monai_icon.apps.physical import load_image, sample_world, world_points
from monai_icon.apps.register import register_files
from monai_icon.apps.validation import check_outputs_spare_inputs, check_registration_arguments
from monai_icon.engines.instance_optimisation import Refinement
from monai_icon.metrics.dice import label_dice

__all__ = ["RESUME_FOLDER", "pair_id", "pair_outputs", "check_pairs", "register_pairs", "PairError", "score_labels"]

RESUME_FOLDER = ".register_pairs"  # per-pair summaries of register_pairs(resume=True), inside the output folder
_PAIR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def pair_id(pair: dict[str, Any], index: int) -> str:
    """A pair's ``pair_id`` (default ``pair<index>``, e.g. ``pair003``), checked to be a safe file-name stem.

    Raises:
        ValueError: not a string or integer, or not 1-100 letters, digits, ``.``, ``_`` or ``-`` starting with a
            letter or digit (no folders, no hidden files, no control characters).
    """
    name = pair.get("pair_id", f"pair{index:03d}")
    if isinstance(name, bool) or not isinstance(name, (str, int)) or not _PAIR_ID.fullmatch(str(name)):
        shown = repr(name)[:60] + ("..." if len(repr(name)) > 60 else "")
        raise ValueError(f"pair {index}: pair_id {shown} must be a plain file name stem: 1-100 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit (it names the pair's output files).")
    return str(name)


def pair_outputs(pair: dict[str, Any], index: int, output_dir: str | Path) -> dict[str, Path | None]:
    """The output files of one pair of a pair datalist: ``<pair_id>_warped.nii.gz``, ``_ddf.nii.gz`` (LPS mm),
    ``_phi.h5`` (ITK transform) and, when the pair has a ``moving_label``, ``_warped_label.nii.gz``
    (``pair_id`` defaults to ``pair<index>``; see :func:`pair_id`)."""
    name = pair_id(pair, index)
    base = Path(output_dir)
    return {
        "warped": base / f"{name}_warped.nii.gz",
        "ddf": base / f"{name}_ddf.nii.gz",
        "transform": base / f"{name}_phi.h5",
        "warped_label": base / f"{name}_warped_label.nii.gz" if pair.get("moving_label") else None,
    }


def check_pairs(pairs: Sequence[dict[str, Any]], output_dir: str | Path,
                extra_outputs: dict[str, str | Path | None] | None = None) -> list[dict[str, Path | None]]:
    """Check a whole pair datalist before any registration: unique, safe ``pair_id`` s, an output folder that is a
    folder, and no output (of any pair, or ``extra_outputs`` such as the summary) that is an input of any pair.

    Returns:
        each pair's :func:`pair_outputs`.

    Raises:
        ValueError: the first problem, naming the pair.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"the output folder {str(output_dir)!r} is a file.")
    ids: dict[str, int] = {}
    outputs: dict[str, str | Path | None] = dict(extra_outputs or {})
    inputs: dict[str, str | Path | None] = {}
    files = []
    for i, pair in enumerate(pairs):
        name = pair_id(pair, i)
        if name in ids:
            raise ValueError(f"pairs {ids[name]} and {i} have the same pair_id {name!r}: their outputs would "
                             "overwrite each other.")
        ids[name] = i
        pair_files = pair_outputs(pair, i, output_dir)
        files.append(pair_files)
        outputs.update({f"pair {name}'s {role}": path for role, path in pair_files.items()})
        inputs.update({f"pair {name}'s {key}": pair.get(key) for key in ("fixed_image", "moving_image",
                                                                         "moving_label", "fixed_label")})
    check_outputs_spare_inputs(outputs, inputs)
    return files


def register_pairs(
    pairs: Sequence[dict[str, Any]],
    model: RegistrationModel | str | Path,
    output_dir: str | Path,
    *,
    refinement: Refinement | None = None,
    device: str | torch.device | None = None,
    resume: bool = False,
    **io_keywords: Any,
) -> list[dict[str, Any]]:
    """Register every pair of a pair datalist (:func:`~monai_icon.data.load_pair_datalist`) in physical space with
    :func:`register_files`, writing :func:`pair_outputs` into ``output_dir``. Prints one line per pair. The settings
    and the whole list are checked first (:func:`~monai_icon.apps.validation.check_registration_arguments`,
    :func:`check_pairs`). ``refinement``: the instance-optimisation settings
    (:class:`~monai_icon.engines.instance_optimisation.Refinement`; default: none), or as the ``io_*`` keywords of
    :func:`register_files` (``io_steps``, ``io_lr``, ``io_mode``, ``io_size``, ``io_levels``, ``io_field_size``,
    ``io_fine_steps``), not both.

    Pairs with both ``moving_label`` and ``fixed_label`` are scored: Dice per label
    (:func:`~monai_icon.metrics.label_dice`) of the warped moving labels against the fixed labels on the fixed
    image's own grid, and of the moving labels placed on that grid unregistered (identity in world space).

    Each pair's random draws (the random points of instance optimisation) are seeded from its ``pair_id``, so its
    result does not depend on the order of the pairs or on the process that registers it (``torchrun``). With
    ``resume``, each finished pair's summary is also kept in ``output_dir/.register_pairs/<pair_id>.json``, and
    a pair whose summary and outputs are there from an earlier run (stopped, failed or killed) is not registered
    again.

    Returns:
        the summaries of :func:`register_files`, one per pair (with ``pair_id`` and, for scored pairs, ``dice``,
        ``dice_unregistered`` and their means ``mean_dice``, ``mean_dice_unregistered``).

    Raises:
        PairError: a pair failed (the message names it and its files; pairs before it are written).
        ValueError: settings out of range, a ``refinement`` together with ``io_*`` keywords, or a problem of the
            list (before any pair is registered).
        TypeError: an unknown keyword.
    """
    (io_keywords,) = split_keywords("register_pairs", io_keywords, REFINEMENT_KEYWORDS)
    settings = check_registration_arguments(refinement_from_keywords(refinement, **io_keywords))
    all_outputs = check_pairs(pairs, output_dir, {"summary": Path(output_dir) / "summary.json"})
    if not isinstance(model, RegistrationModel):
        model = load_registration_model(model, device)
    summaries = []
    for i, (pair, outputs) in enumerate(zip(pairs, all_outputs)):
        name = pair_id(pair, i)
        record = Path(output_dir) / RESUME_FOLDER / f"{name}.json"
        if resume and record.is_file() and all(p is None or p.is_file() for p in outputs.values()):
            summaries.append(json.loads(record.read_text()))
            print(f"{name}: done by an earlier run", flush=True)
            continue
        try:
            with _seeded(name):
                summary = register_files(inputs=PairFiles(pair["fixed_image"], pair["moving_image"],
                                                          moving_label=pair.get("moving_label")),
                                         outputs=OutputFiles(**outputs), model=model, refinement=settings,
                                         device=device)
            summary["pair_id"] = name
            line = f"{name}: {summary['seconds']:.2f} s, folds {summary['folds_percent']:.3f} %"
            if pair.get("fixed_label") and outputs["warped_label"] is not None:
                summary.update(score_labels(pair["fixed_label"], pair["moving_label"], outputs["warped_label"]))
                line += f", label Dice {summary['mean_dice_unregistered']:.3f} -> {summary['mean_dice']:.3f}"
        except Exception as err:
            raise PairError(f"pair {name} (pair {i + 1} of {len(pairs)}; fixed {pair['fixed_image']}, moving "
                            f"{pair['moving_image']}): {err}") from err
        if resume:
            write_text(record, json.dumps(summary, default=str), "pair summary")
        print(line, flush=True)
        summaries.append(summary)
    return summaries


@contextmanager
def _seeded(name: str) -> Iterator[None]:
    """PyTorch's random draws (the random points of instance optimisation) seeded from the pair's id, the global
    generators restored afterwards: a pair's result does not depend on the order or the process it runs in."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(name.encode()))
        yield


class PairError(ValueError):
    """A pair of :func:`register_pairs` failed; the message names the pair and its files."""


def score_labels(fixed_label: str | Path, moving_label: str | Path, warped_label: str | Path) -> dict[str, Any]:
    """Dice per label (the fixed label map's nonzero labels) of the warped labels and of the unregistered moving
    labels (resampled, nearest, onto the fixed grid by the identity in world space), both on the fixed grid."""
    fixed = load_image(fixed_label, "fixed label")
    fixed_affine = np.asarray(fixed.affine, dtype=np.float64)
    target = fixed.as_tensor()[0].round().long()
    warped = load_image(warped_label, "warped label").as_tensor()[0].round().long()
    moving = load_image(moving_label, "moving label")
    points = world_points(fixed_affine, tuple(target.shape))
    before = sample_world(moving.as_tensor()[:1], np.asarray(moving.affine, dtype=np.float64), points,
                          mode="nearest")[0].round().long()
    labels = [int(v) for v in torch.unique(target) if v != 0]
    after_dice, before_dice = label_dice(warped, target, labels), label_dice(before, target, labels)

    def mean(values: dict[int, float]) -> float:
        finite = [v for v in values.values() if v == v]
        return float(np.mean(finite)) if finite else float("nan")

    return {"dice": after_dice, "dice_unregistered": before_dice, "mean_dice": mean(after_dice),
            "mean_dice_unregistered": mean(before_dice)}
