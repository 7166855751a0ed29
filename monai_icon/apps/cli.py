# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The ``monai-icon`` command line (also ``python -m monai_icon``).

Sub-commands:

* ``register``: register a moving image file to a fixed one with a trained model; write the warped image, the
  displacement field and an ITK transform on the fixed image's grid in physical space.
* ``register-pairs``: register every pair of a pair datalist (the same outputs per pair) and, for pairs with both
  label maps, report Dice per label before and after registration on the fixed grid, folds and seconds per pair.
* ``warp``: apply a written transform to another image or label map, on a chosen reference grid.
* ``jacobian``: the Jacobian determinant (or its log) of a written transform in physical space, and its folds.
* ``datalist``: build a knee datalist (JSON) from an OAI-like folder.
* ``synthetic-knees``: write synthetic knee volumes and cartilage labels (an OAI-like folder for testing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage is in ``--help``)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _numbers(text: str, kind: type, separators: str) -> list:
    parts = re.split(f"[{separators}]", text.strip())
    try:
        if not text.strip() or any(not p.strip() for p in parts):
            raise ValueError
        return [kind(p) for p in parts]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"expected {what} separated by commas (e.g. 1,2,3), got {text!r}") from None


def _ints(text: str) -> list[int]:
    """``"128,64,128"`` or ``"128x64x128"``; anything else is refused (argparse names the flag)."""
    return _numbers(text, int, ",x")


def _floats(text: str) -> list[float]:
    return _numbers(text, float, ",")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from monai_icon.networks.ensemble import DEFAULT_PASSES

    parser.add_argument(
        "--model",
        required=True,
        help="model file (save_registration_model), bundle folder, or published weights (with --model-kind)",
    )
    parser.add_argument("--model-kind", choices=["icon_oai", "gradicon_oai", "unigradicon", "multigradicon"],
                        help="the published model that --model holds weights of (you bring the file)")
    parser.add_argument("--window", type=_floats, help="map this intensity range to 0..1, e.g. -1000,1000 for CT")
    parser.add_argument("--percentiles", type=_floats,
                        help="map these intensity percentiles to 0..1, e.g. 0,99 (MRI)")
    parser.add_argument("--symmetric", action="store_true",
                        help="test-time ensemble: average the network's moving-to-fixed map with the inverse of its "
                             "fixed-to-moving one (twice the network evaluations)")
    parser.add_argument("--flip-axes", type=_ints, default=None,
                        help="test-time ensemble: also register the images mirrored along these axes of the model's "
                             "grid and average (e.g. 0: left-right for RAS models of heads); one more network "
                             "evaluation per axis and direction")
    parser.add_argument("--passes", type=int, default=None,
                        help="apply the network (or its --symmetric/--flip-axes ensemble) this many times, each to the "
                             f"moving image warped by the maps so far, and compose the maps (default {DEFAULT_PASSES})")
    parser.add_argument("--flip-passes", type=int, default=None,
                        help="with --flip-axes and --passes: the mirrored images in the first this many passes only "
                             "(e.g. 1 with --ensemble: about 0.8 of its time; default: every pass)")
    parser.add_argument("--ensemble", action="store_true",
                        help="the recommended test-time ensemble: --symmetric --flip-axes 0 --passes 2 (flags given "
                             "explicitly take precedence)")


def _add_io_arguments(parser: argparse.ArgumentParser) -> None:
    from monai_icon.engines.instance_optimisation import DEFAULT_IO_LR, IO_MODES, Refinement
    from monai_icon.losses.similarity import DEFAULT_LNCC_KERNEL

    defaults = Refinement()
    rates = ", ".join(f"{rate:g} {mode}" for mode, rate in DEFAULT_IO_LR.items())

    parser.add_argument("--refine", nargs="?", const="one-way", choices=["one-way", "symmetric"], default=None,
                        help="a recommended per-pair refinement (monai_icon.apps.presets). one-way (the default of "
                             "--refine): a residual field added to the network's moving-to-fixed displacement on 4 "
                             "levels, LNCC (window 3) + diffusion (weight 2), 28 Adam steps at 7e-3, the images "
                             "compared on a grid of about 614,400 voxels shaped like the fixed image's field of view "
                             "in the last 4 steps (on half of it before); 1-2 s per 3D pair on 2 CPU cores. symmetric: "
                             "residual "
                             "fields on both maps with LNCC (window 5) + GradICON (lambda 4), 36 steps at 3e-3, the "
                             "last 18 on the model's full grid: inverse-consistent, about 8 times slower. Any --io-*, "
                             "--similarity, --lncc-kernel, --regularizer or --lmbda flag given explicitly overrides "
                             "the preset's value")
    parser.add_argument("--io-steps", type=int, default=None,
                        help=f"instance optimisation steps per pair (default {defaults.steps})")
    parser.add_argument("--io-lr", type=float, default=None,
                        help=f"instance optimisation learning rate (Adam; default {rates})")
    parser.add_argument("--io-mode", choices=list(IO_MODES), default=None,
                        help="fine-tune the network's weights (network), optimise residual displacement fields on top "
                             "of its maps in both directions with its inverse-consistency loss (residual, much faster "
                             "per step), or one residual field on its moving-to-fixed map with a diffusion "
                             "regulariser (one-way, faster still)")
    parser.add_argument("--io-smoothness", type=float, default=None,
                        help="with --io-mode one-way: weight of the diffusion regulariser of the residual (default "
                             f"{defaults.smoothness:g})")
    parser.add_argument("--io-voxels", type=int, default=None,
                        help="with a residual --io-mode and no --io-size/--io-field-size: compare the images on a grid "
                             "of about this many voxels shaped like the fixed image's field of view (one spacing on "
                             "every axis), the fields on half of it")
    parser.add_argument("--io-size", type=_ints,
                        help="with a residual --io-mode: the finer grid the images are compared on (and, without "
                             "--io-field-size, the residual optimised on), in the model's axis order, e.g. 128,64,128")
    parser.add_argument("--io-field-size", type=_ints,
                        help="with a residual --io-mode: the grid of the residual fields and the regulariser when it "
                             "differs from --io-size, e.g. the network grid: fine similarity, coarse fields")
    parser.add_argument("--io-fine-steps", type=int, default=None,
                        help="with --io-size: only the last this many steps compare the images on --io-size, the "
                             "others on the residual fields' grid (default: all)")
    parser.add_argument("--io-levels", type=int, default=None,
                        help="with a residual --io-mode: residual fields on this many grids, each half the previous "
                             f"one (coarse-to-fine; default {defaults.levels})")
    parser.add_argument("--similarity", choices=["mse", "lncc", "mi", "mind"],
                        help="similarity of instance optimisation (default: the model's)")
    parser.add_argument("--lncc-kernel", type=int, default=None,
                        help="window of the LNCC similarity of instance optimisation, in voxels of the grid the "
                             f"images are compared on (odd, >= 3; default {DEFAULT_LNCC_KERNEL}); needs the lncc "
                             "similarity")
    parser.add_argument("--lmbda", type=float,
                        help="inverse-consistency weight of instance optimisation (default: the model's)")
    parser.add_argument("--regularizer", choices=["icon", "gradicon"],
                        help="regulariser of instance optimisation (default: the model's)")
    parser.add_argument("--spatial-size", type=_ints, help="override the model's network grid, e.g. 192,192,80")
    parser.add_argument("--isotropic-grid", action="store_true", default=None,
                        help="register each pair on a network grid shaped like the fixed image's field of view (one "
                             "spacing on every axis) with as many voxels as the model's grid, instead of the model's "
                             "grid itself (for images whose field of view has another aspect than the training "
                             "images')")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _apply_presets(args: argparse.Namespace) -> None:
    """Fill the flags that ``--ensemble`` / ``--refine`` set (where not given explicitly), then the plain defaults;
    the refinement's grids need the model (:func:`_apply_refinement_grids`)."""
    from monai_icon.apps.presets import RECOMMENDED_ENSEMBLE, REFINEMENT_PRESETS

    if args.ensemble:
        args.symmetric = True
        args.flip_axes = RECOMMENDED_ENSEMBLE["flip_axes"] if args.flip_axes is None else args.flip_axes
        args.passes = RECOMMENDED_ENSEMBLE["passes"] if args.passes is None else args.passes
    from monai_icon.engines.instance_optimisation import Refinement
    from monai_icon.networks.ensemble import DEFAULT_PASSES

    args.passes = DEFAULT_PASSES if args.passes is None else args.passes
    args.preset_filled = set()  # settings a preset chose (adapted to the model's grid where they must be)
    if getattr(args, "refine", False):
        for key, value in REFINEMENT_PRESETS[args.refine].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
                args.preset_filled.add(key)
    defaults = Refinement().arguments()
    for key, value in ((k, defaults[k]) for k in ("io_steps", "io_mode", "io_levels")):
        if getattr(args, key, value) is None:
            setattr(args, key, value)


def _apply_refinement_grids(args: argparse.Namespace, spatial_size) -> None:
    """With ``--refine``: the grids of its preset (a preset without ``io_voxels`` compares the images on the model's
    grid, the fields on half of it), unless given."""
    if getattr(args, "refine", False):
        from monai_icon.apps.presets import REFINEMENT_PRESETS, refinement_arguments

        settings = refinement_arguments(spatial_size, REFINEMENT_PRESETS[args.refine])
        args.io_size = settings.get("io_size") if args.io_size is None else args.io_size
        args.io_field_size = settings.get("io_field_size") if args.io_field_size is None else args.io_field_size
        if args.io_size is not None or args.io_field_size is not None:
            args.io_voxels = None  # explicit grids replace the grid chosen from the fixed image


def _load_model(args: argparse.Namespace, device):
    from monai_icon.apps.model_files import load_registration_model

    overrides = {k: v for k, v in (("window", args.window), ("percentiles", args.percentiles),
                                   ("similarity", args.similarity), ("lmbda", args.lmbda),
                                   ("regularizer", args.regularizer), ("isotropic", args.isotropic_grid))
                 if v is not None}
    if args.window is not None:
        overrides["percentiles"] = None
    model = load_registration_model(args.model, device, args.spatial_size, args.model_kind, **overrides)
    _apply_refinement_grids(args, model.spatial_size)
    _check_model_arguments(args, model)
    if args.lncc_kernel is not None:
        from monai_icon.losses import get_similarity

        model.similarity = get_similarity("lncc", model.spatial_dims, kernel_size=args.lncc_kernel)
    from monai_icon.networks import ensemble_network

    model.network = ensemble_network(model.network, args.symmetric, args.flip_axes or [], passes=args.passes,
                                     flip_passes=args.flip_passes)
    return model


def _check_arguments(args: argparse.Namespace, model=None):
    """Every flag of ``register`` / ``register-pairs`` checked by the Python API's one check
    (:func:`~monai_icon.apps.validation.check_registration_arguments`), its messages naming the flags; before the
    model is loaded, then with it (:func:`_check_model_arguments`). Returns the instance-optimisation settings."""
    from monai_icon.apps.validation import FLAG_NAMES, check_registration_arguments

    checked = check_registration_arguments(
        _refinement(args), getattr(args, "label_weight", 0.0), model=model, passes=args.passes,
        lncc_kernel=args.lncc_kernel, spatial_size=args.spatial_size, flip_axes=args.flip_axes,
        flip_passes=args.flip_passes, names=FLAG_NAMES,
        fit_levels="io_levels" in getattr(args, "preset_filled", ()))  # --refine on a small grid: fewer levels
    args.io_levels = checked.levels
    return checked


def _check_model_arguments(args: argparse.Namespace, model) -> None:
    """The flags again, now with the limits that come from the model's grid."""
    _check_arguments(args, model)


def _refinement(args: argparse.Namespace):
    """The ``--io-*`` flags as one :class:`~monai_icon.engines.instance_optimisation.Refinement`."""
    from monai_icon.engines.instance_optimisation import Refinement

    smoothness = Refinement().smoothness if args.io_smoothness is None else args.io_smoothness
    return Refinement(steps=args.io_steps, lr=args.io_lr, mode=args.io_mode, size=args.io_size,
                      levels=args.io_levels, field_size=args.io_field_size, fine_steps=args.io_fine_steps,
                      smoothness=smoothness, voxels=args.io_voxels)


def _add_backend_arguments(parser: argparse.ArgumentParser, expert: bool = False) -> None:
    parser.add_argument("--cpu-backend", choices=["auto", "on", "off"], default="auto",
                        help="CPU optimisations (monai_icon.backend; same results up to rounding, faster on CPU; none "
                             "on GPUs): auto (default) = those that need no compilation (trilinear sampling by "
                             "vectorised kernels, glibc's allocator keeping freed memory); on = also the sampler and "
                             "the LNCC compiled by torch.compile (the first registration waits for the compilation); "
                             "off = none")
    if not expert:
        return
    parser.add_argument("--fast-sampler", action="store_true",
                        help="with --cpu-backend auto or off: the compiled sampler all the same (3D image warps)")
    parser.add_argument("--compiled-lncc", action="store_true",
                        help="with --cpu-backend auto or off: the compiled LNCC all the same (refinement steps)")


def _cpu_backend(args: argparse.Namespace):
    """``--cpu-backend`` with ``--fast-sampler`` / ``--compiled-lncc`` as one
    :class:`~monai_icon.backend.CPUBackend`: ``auto`` leaves the compiled kernels to ``on`` or to their flags (their
    compilation pays over many registrations, not for one pair)."""
    from monai_icon.backend import CPUBackend

    compiled = None if args.cpu_backend == "on" else False  # None: as the mode says
    return CPUBackend(args.cpu_backend, fast_sampler=True if getattr(args, "fast_sampler", False) else compiled,
                      compiled_lncc=True if getattr(args, "compiled_lncc", False) else compiled)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="monai-icon", description="ICON inverse-consistent registration (MONAI).")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also MONAI_ICON_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register a moving image file to a fixed one (outputs on the fixed grid)")
    reg.add_argument("--fixed", required=True, help="fixed image file (NIfTI, MHA, NRRD, ...)")
    reg.add_argument("--moving", required=True, help="moving image file")
    _add_model_arguments(reg)
    reg.add_argument("--warped", help="output: moving image resampled onto the fixed grid")
    reg.add_argument("--ddf", help="output: displacement field, LPS mm on the fixed grid (ITK/ANTs/Slicer convention)")
    reg.add_argument("--transform", help="output: ITK displacement-field transform (.h5), fixed -> moving points")
    reg.add_argument("--moving-label", help="moving label map to warp (with --warped-label)")
    reg.add_argument("--warped-label", help="output: moving labels on the fixed grid")
    reg.add_argument("--fixed-label", help="fixed label map, for label-supervised instance optimisation")
    reg.add_argument("--label-weight", type=float, default=0.0,
                     help="weight of the Dice term of --moving-label/--fixed-label in instance optimisation")
    reg.add_argument("--fixed-mask", help="fixed mask file (with --moving-mask): input and loss masking")
    reg.add_argument("--moving-mask", help="moving mask file (with --fixed-mask)")
    reg.add_argument("--fixed-side", help="knee side of the fixed image (LEFT/RIGHT) for one-sided knee models")
    reg.add_argument("--moving-side", help="knee side of the moving image")
    _add_io_arguments(reg)
    _add_backend_arguments(reg)

    rp = sub.add_parser("register-pairs", help="register every pair of a pair datalist (outputs per pair; label Dice "
                                               "before/after where pairs have both label maps)")
    rp.add_argument("--datalist", required=True, help="pair datalist JSON (moving_image, fixed_image, optional "
                                                      "moving_label, fixed_label, pair_id)")
    rp.add_argument("--key", default="pairs", help="key of the pairs in the JSON (default pairs; test_pairs or "
                                                   "validation_pairs for a monai-icon datalist)")
    rp.add_argument("--output-dir", required=True, help="folder of the outputs and summary.json")
    rp.add_argument("--resume", action="store_true",
                    help="keep each finished pair's summary (OUTPUT_DIR/.register_pairs) and skip the pairs an earlier "
                         "run with --resume finished (after a stop, a failure or a killed process)")
    _add_model_arguments(rp)
    _add_io_arguments(rp)
    _add_backend_arguments(rp, expert=True)

    wp = sub.add_parser("warp", help="apply a written transform (.h5 or LPS-mm displacement image) to an image/labels")
    wp.add_argument("--moving", required=True, help="image or label map to warp")
    wp.add_argument("--transform", required=True, help="transform written by monai-icon register (.h5 or --ddf)")
    wp.add_argument("--output", required=True, help="output file")
    wp.add_argument("--reference", help="image whose grid the output takes (default: the transform's grid)")
    wp.add_argument("--mode", choices=["linear", "nearest", "label"], default="linear",
                    help="linear (images), nearest, or label (one-hot linear + arg-max for label maps)")

    jac = sub.add_parser("jacobian", help="Jacobian determinant of a written transform in physical space")
    jac.add_argument("--transform", required=True, help="transform written by monai-icon register (.h5 or --ddf)")
    jac.add_argument("--output", help="NIfTI/MHA/NRRD of the determinant per cell (optional)")
    jac.add_argument("--log", action="store_true", help="write the natural log of the determinant (NaN at folds)")

    dl = sub.add_parser("datalist", help="build a knee datalist JSON from an OAI-like folder")
    dl.add_argument("folder", help="folder with *image.nii.gz files (side in the name) and matching *label* files")
    dl.add_argument("--output", required=True, help="datalist JSON to write (paths stored relative to it)")
    dl.add_argument("--test-fraction", type=float, default=0.2, help="fraction of subjects held out (default 0.2)")
    dl.add_argument("--test-pairs", type=int, default=20, help="number of fixed test pairs (default 20)")
    dl.add_argument("--val-fraction", type=float, default=0.0,
                    help="fraction of the other subjects held out for validation pairs (default 0: none)")
    dl.add_argument("--val-pairs", type=int, default=None, help="number of validation pairs (default: --test-pairs)")
    dl.add_argument("--seed", type=int, default=0)
    dl.add_argument("--image-pattern", default="*image.nii*", help="glob of image files (default *image.nii*)")

    syn = sub.add_parser("synthetic-knees", help="write synthetic knee volumes with cartilage labels")
    syn.add_argument("folder")
    syn.add_argument("--subjects", type=int, default=8)
    syn.add_argument("--shape", type=_ints, default=[96, 96, 40], help="grid, e.g. 96,96,40")
    syn.add_argument("--spacing", type=_floats, default=[1.4, 1.4, 3.0], help="voxel size in mm, e.g. 1.4,1.4,3")
    syn.add_argument("--seed", type=int, default=0)
    return parser


def _default_device(name: str | None):
    import torch

    from monai_icon.apps.validation import check_device

    return check_device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _prepare(args: argparse.Namespace, device_name: str | None = None):
    """Shared start of ``register`` and ``register-pairs``: presets, checks, device, model, and the CPU backend
    (``--cpu-backend``; it tunes the allocator on the CPU) in force on that device until the command ends."""
    _apply_presets(args)
    _check_arguments(args)
    device = _default_device(device_name or args.device)
    from monai_icon.backend import use_backend

    model = _load_model(args, device)
    args.scope.enter_context(use_backend(_cpu_backend(args), device))
    return device, model


def _run_register(args: argparse.Namespace) -> None:
    from monai_icon.apps.files import OutputFiles, PairFiles
    from monai_icon.apps.register import register_files

    device, model = _prepare(args)
    inputs = PairFiles(args.fixed, args.moving, fixed_label=args.fixed_label, moving_label=args.moving_label,
                       fixed_mask=args.fixed_mask, moving_mask=args.moving_mask, fixed_side=args.fixed_side,
                       moving_side=args.moving_side)
    outputs = OutputFiles(warped=args.warped, ddf=args.ddf, transform=args.transform, warped_label=args.warped_label)
    summary = register_files(inputs=inputs, outputs=outputs, model=model, refinement=_refinement(args), device=device,
                             label_weight=args.label_weight)
    print(json.dumps(summary, indent=1))


def _run_register_pairs(args: argparse.Namespace) -> None:
    """Every pair of the datalist; under ``torchrun`` each process (rank) registers its share of the pairs on its
    own device (:mod:`monai_icon.apps.distributed`) and rank 0 writes the one ``summary.json``."""
    from monai_icon.apps.atomic_io import write_text
    from monai_icon.apps.distributed import (gather_in_order, process_group, rank_device, rank_failures, shard_pairs,
                                             torchrun_env)
    from monai_icon.apps.batch import PairError, check_pairs, pair_id, register_pairs
    from monai_icon.apps.validation import check_outputs_spare_inputs
    from monai_icon.data import load_pair_datalist

    pairs = load_pair_datalist(args.datalist, args.key)
    output_dir = Path(args.output_dir)
    summary_file = output_dir / "summary.json"
    check_pairs(pairs, output_dir, {"summary": summary_file})  # everything about the pairs, before the model
    check_outputs_spare_inputs({"summary": summary_file}, {"datalist": args.datalist})
    pairs = [{**pair, "pair_id": pair_id(pair, i)} for i, pair in enumerate(pairs)]  # ids of the whole list
    env = torchrun_env()
    device, model = _prepare(args, str(rank_device(args.device, env)) if env.distributed else None)
    output_dir.mkdir(parents=True, exist_ok=True)
    with process_group(device) as env:
        mine = shard_pairs(pairs, env.rank, env.world_size)
        failure: PairError | None = None
        done: list[dict[str, Any]] = []
        try:
            done = register_pairs([pair for _, pair in mine], model, output_dir, refinement=_refinement(args),
                                  device=device, resume=args.resume)
        except PairError as err:
            if not env.distributed:
                raise
            failure = err  # the other ranks finish their pairs first: their work is kept for --resume
        failed = rank_failures(failure)
        if failure is not None:
            raise PairError(f"{failure} [rank {env.rank} of {env.world_size}]") from failure
        if failed:
            others = "; ".join(f"rank {rank} failed: {message}" for rank, message in sorted(failed.items()))
            raise PairError(f"rank {env.rank} of {env.world_size} registered its pairs, but no summary.json was "
                            f"written because {others}. Fix that pair and run again with --resume: finished pairs "
                            "are not registered again.")
        summaries = gather_in_order([(index, summary) for (index, _), summary in zip(mine, done)], len(pairs))
    if summaries is None:  # not rank 0: its pairs are in rank 0's summary
        return
    scored = [s for s in summaries if "mean_dice" in s]
    means = {"pairs": len(summaries), "seconds_per_pair": float(np.mean([s["seconds"] for s in summaries])),
             "folds_percent": float(np.mean([s["folds_percent"] for s in summaries]))}
    if scored:
        means.update(mean_dice_unregistered=float(np.mean([s["mean_dice_unregistered"] for s in scored])),
                     mean_dice=float(np.mean([s["mean_dice"] for s in scored])), scored_pairs=len(scored))
    write_text(summary_file, json.dumps({"mean": means, "pairs": summaries}, indent=1, default=str), "summary")
    text = f"{means['pairs']} pairs, {means['seconds_per_pair']:.2f} s per pair, folds {means['folds_percent']:.3f} %"
    if scored:
        text += (f"; mean label Dice {means['mean_dice_unregistered']:.3f} (unregistered) -> {means['mean_dice']:.3f}"
                 f" on {len(scored)} labelled pairs")
    if env.distributed:
        text += f"; {env.world_size} processes"
    print(f"{text}; outputs and summary.json in {output_dir}")


def _run_warp(args: argparse.Namespace) -> None:
    from monai_icon.apps.transform_files import warp_file

    print(f"wrote {warp_file(args.moving, args.transform, args.output, args.reference, args.mode)}")


def _run_jacobian(args: argparse.Namespace) -> None:
    from monai_icon.apps.transform_files import jacobian_file

    print(json.dumps(jacobian_file(args.transform, args.output, args.log), indent=1))


def _run_datalist(args: argparse.Namespace) -> None:
    from monai_icon.apps.validation import check_count, check_fraction, check_output_path
    from monai_icon.data.knee_datalist import build_knee_datalist, write_datalist

    if not check_fraction(args.test_fraction, "--test-fraction") > 0:
        raise ValueError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}.")
    check_count(args.test_pairs, "--test-pairs")
    check_fraction(args.val_fraction, "--val-fraction")
    if args.val_pairs is not None:
        check_count(args.val_pairs, "--val-pairs")
    if Path(args.folder).exists() and not Path(args.folder).is_dir():
        raise ValueError(f"{args.folder!r} is a file, not a folder.")
    check_output_path(args.output, "--output", (".json",))
    output = Path(args.output)
    datalist = build_knee_datalist(args.folder, args.test_fraction, args.test_pairs, args.seed,
                                   args.image_pattern, relative_to=output.parent,
                                   val_fraction=args.val_fraction, num_val_pairs=args.val_pairs)
    write_datalist(datalist, output)
    print(f"{datalist['description']}; written to {output}")


def _run_synthetic_knees(args: argparse.Namespace) -> None:
    from monai_icon.apps.physical import check_memory
    from monai_icon.apps.validation import MIN_SPACING_MM, check_count, check_sizes
    from monai_icon.data.synthetic_knee import write_synthetic_knees

    check_count(args.subjects, "--subjects", minimum=1)
    check_sizes(args.shape, "--shape", length=3, minimum=2)
    check_sizes(args.spacing, "--spacing", length=3, minimum=MIN_SPACING_MM, integer=False)
    check_memory(int(np.prod(args.shape)), 16, f"a knee of --shape {args.shape}")
    folder = Path(args.folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{args.folder!r} is a file, not a folder.")
    records = write_synthetic_knees(folder, args.subjects, args.shape, args.spacing, seed=args.seed)
    print(f"wrote {len(records)} knees (image + label) to {args.folder}")


_HANDLERS = {"register": _run_register, "register-pairs": _run_register_pairs, "warp": _run_warp,
             "jacobian": _run_jacobian, "datalist": _run_datalist, "synthetic-knees": _run_synthetic_knees}
_USER_ERRORS = (ValueError, FileNotFoundError, MemoryError, OSError)


def _one_line(err: BaseException) -> str:
    """An exception as one line: its message (its type too when that is not a plain user error)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, _USER_ERRORS) or isinstance(err, RecursionError):
        text = f"{type(err).__name__}: {text}"
    return text[:2000]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command. Any error ends as one line on stderr (``monai-icon <command>: error: ...``) and exit
    status 2 (1 for an unexpected failure, 130 when interrupted); ``--debug`` or ``MONAI_ICON_DEBUG=1`` shows the
    traceback instead."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MONAI_ICON_DEBUG", "") not in ("", "0")
    try:
        with contextlib.ExitStack() as scope:
            args.scope = scope  # what a sub-command keeps in force until it ends (the CPU backend: _prepare)
            _HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print(f"monai-icon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"monai-icon {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, _USER_ERRORS) and not isinstance(err, RecursionError) else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
