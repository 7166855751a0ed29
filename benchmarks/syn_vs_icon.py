#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""ICON against a classical registration (ANTs SyN) on the same labelled pairs, with the same Dice code.

For each pair of a datalist's ``test_pairs`` (moving/fixed image and label files, as ``monai-icon datalist``
writes them) both methods write the moving label warped onto the **fixed image's own grid**; Dice per label is
then computed by one function (:func:`label_dice`) for the unregistered pair, ICON (``monai_icon.apps.register_files``,
as ``monai-icon register`` runs it, optionally with instance optimisation) and SyN
(``ants.registration(fixed, moving, "SyN")`` with its defaults, labels by ``genericLabel``). Time per pair is
the registration call's wall-clock on this machine, measured the same way for both (files already loaded by the
method's own reader; writing excluded; one process, glibc's allocator tuned as the CLI tunes it). Folds of the
ICON map are counted on the network grid (the metric of ``monai_icon.metrics``).

    pip install antspyx       # a benchmark dependency only
    python benchmarks/syn_vs_icon.py --datalist runs/t1head_demo/datalist.json \\
        --model runs/t1head_demo/stage1/models/registration_model.pt --out runs/syn_vs_icon [--no-syn] \
        [--io-steps 50 [--io-mode residual [--io-size 128,64,128]]]  # grids in the reoriented (RAS) axis order
        [--symmetric --flip-axes 0 --passes 2]  # the network alone as a test-time ensemble, applied twice

Writes ``<out>/results.json`` (per pair and means) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def label_dice(warped_label: np.ndarray, fixed_label: np.ndarray, labels: list[int]) -> dict[int, float]:
    """Dice per label of two integer label arrays on one grid: :func:`monai_icon.metrics.label_dice` (the function
    ``monai-icon register-pairs`` reports with), for every method alike."""
    import torch

    from monai_icon.metrics import label_dice as dice

    return dice(torch.as_tensor(warped_label), torch.as_tensor(fixed_label), labels)


def _read_labels(path: str | Path) -> np.ndarray:
    return np.rint(np.asarray(nib.load(str(path)).dataobj)).astype(np.int32)


def run_icon(pair: dict, model, refinement, work: Path) -> dict:
    """ICON on one pair as ``monai-icon register`` runs it, with ``refinement`` (a
    :class:`monai_icon.engines.instance_optimisation.Refinement`)."""
    from monai_icon.apps import register_files

    out = work / "icon_label.nii.gz"
    summary = register_files(pair["fixed_image"], pair["moving_image"], model, moving_label=pair["moving_label"],
                             warped_label=out, refinement=refinement)
    return {"warped_label": _read_labels(out), "seconds": summary["seconds"],
            "folds_percent": summary["folds_percent"]}


def run_syn(pair: dict, work: Path, threads: int, transform: str = "SyN") -> dict:
    import ants

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    fixed, moving = ants.image_read(str(pair["fixed_image"])), ants.image_read(str(pair["moving_image"]))
    label = ants.image_read(str(pair["moving_label"]))
    start = time.perf_counter()
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform, outprefix=str(work / "syn_"))
    seconds = time.perf_counter() - start
    warped = ants.apply_transforms(fixed=fixed, moving=label, transformlist=reg["fwdtransforms"],
                                   interpolator="genericLabel")
    out = work / "syn_label.nii.gz"
    ants.image_write(warped, str(out))
    return {"warped_label": _read_labels(out), "seconds": seconds}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--model", help="ICON model file or bundle folder (monai-icon register --model)")
    p.add_argument("--key", default="test_pairs", help="datalist key of the pairs (default test_pairs)")
    p.add_argument("--pairs", type=int, default=None, help="only the first N pairs")
    p.add_argument("--io-steps", type=int, default=0)
    p.add_argument("--io-lr", type=float, default=None, help="default 2e-5 (network) / 2e-3 (residual)")
    p.add_argument("--io-mode", choices=["network", "residual", "one-way"], default="network")
    p.add_argument("--io-size", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="residual instance optimisation on this finer grid, e.g. 128,64,128")
    p.add_argument("--io-levels", type=int, default=1, help="residual fields on this many grids (coarse-to-fine)")
    p.add_argument("--io-field-size", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="grid of the residual fields and the regulariser when the images are compared on --io-size")
    p.add_argument("--io-fine-steps", type=int, default=None, help="only the last this many steps on --io-size")
    p.add_argument("--io-smoothness", type=float, default=None, help="diffusion weight of --io-mode one-way")
    p.add_argument("--io-voxels", type=int, default=None,
                   help="compare the images on a grid of about this many voxels shaped like the fixed image")
    p.add_argument("--similarity", help="similarity of instance optimisation (default: the model's)")
    p.add_argument("--lmbda", type=float, help="inverse-consistency weight of instance optimisation")
    p.add_argument("--regularizer", choices=["icon", "gradicon"], help="of instance optimisation (default: model's)")
    p.add_argument("--symmetric", action="store_true",
                   help="ICON with the test-time ensemble of phi_AB and the inverse of phi_BA (monai-icon register "
                        "--symmetric)")
    p.add_argument("--flip-axes", type=lambda t: [int(v) for v in t.split(",") if v], default=None,
                   help="ICON's ensemble also on the images mirrored along these grid axes (e.g. 0: left-right, RAS)")
    p.add_argument("--passes", type=int, default=1, help="ICON (or its ensemble) applied this many times, composed")
    p.add_argument("--flip-passes", type=int, default=None,
                   help="the mirrored images in the first this many passes only (monai-icon register --flip-passes)")
    p.add_argument("--refine", nargs="?", const="one-way", choices=["one-way", "symmetric"], default=None,
                   help="ICON with a recommended refinement (monai-icon register --refine [NAME]; "
                        "monai_icon.apps.presets); --io-* flags and --lmbda given explicitly override its values")
    p.add_argument("--syn-transform", default="SyN", choices=["SyN", "SyNOnly"],
                   help="ANTs type_of_transform (SyN: affine then SyN, the default; SyNOnly: no affine step)")
    p.add_argument("--isotropic-grid", action="store_true",
                   help="the network grid shaped like each fixed image (monai-icon register --isotropic-grid)")
    p.add_argument("--no-syn", action="store_true", help="skip SyN (e.g. to add ICON settings to earlier results)")
    p.add_argument("--threads", type=int, default=2, help="threads for both methods")
    p.add_argument("--out", default="runs/syn_vs_icon")
    p.add_argument("--tag", default=None, help="name of the ICON row (default: icon or icon+io<steps>)")
    return p


def icon_method(args: argparse.Namespace) -> tuple[str, object, object]:
    """The ICON row of parsed arguments: ``(tag, model, refinement)`` (``model`` ``None`` without ``--model``), the
    model loaded once and set up as ``monai-icon register`` sets it up from the same flags."""
    p = parser()
    model = None
    tag = args.tag or ("icon" if not args.io_steps else f"icon+io{args.io_steps}-{args.io_mode}")
    io_lr = args.io_lr
    if args.model:
        from monai_icon.apps import load_registration_model

        settings = (("similarity", args.similarity), ("lmbda", args.lmbda), ("regularizer", args.regularizer),
                    ("isotropic", True if args.isotropic_grid else None))
        overrides = {k: v for k, v in settings if v is not None}
        model = load_registration_model(args.model, **overrides)
        from monai_icon.networks import ensemble_network

        model.network = ensemble_network(model.network, args.symmetric, args.flip_axes or [], passes=args.passes,
                                         flip_passes=args.flip_passes)
        if args.refine:
            from monai_icon.apps.presets import REFINEMENT_PRESETS, refinement_arguments
            from monai_icon.losses import get_similarity

            # explicit io flags (different from their defaults) override the preset's values
            given = {k: getattr(args, k) for k in ("io_steps", "io_lr", "io_mode", "io_size", "io_levels",
                                                   "io_field_size", "io_fine_steps", "io_smoothness", "io_voxels",
                                                   "lmbda", "regularizer")
                     if getattr(args, k) != p.get_default(k)}
            if "io_size" in given or "io_field_size" in given:
                given["io_voxels"] = None  # explicit grids replace the grid chosen from the fixed image
            settings = refinement_arguments(model.spatial_size, REFINEMENT_PRESETS[args.refine], **given)
            if given.get("io_voxels", 0) is None:
                settings["io_voxels"] = None
            model.similarity = get_similarity(settings["similarity"], len(model.spatial_size),
                                              kernel_size=settings["lncc_kernel"])
            model.lmbda = settings.get("lmbda", model.lmbda)
            model.regularizer = settings.get("regularizer", model.regularizer)
            args.io_steps, io_lr, args.io_mode = settings["io_steps"], settings["io_lr"], settings["io_mode"]
            args.io_size, args.io_levels = settings.get("io_size"), settings["io_levels"]
            args.io_field_size, args.io_fine_steps = settings.get("io_field_size"), settings["io_fine_steps"]
            args.io_smoothness, args.io_voxels = settings.get("io_smoothness"), settings.get("io_voxels")
    from monai_icon.engines.instance_optimisation import Refinement

    refinement = Refinement(
        steps=args.io_steps, lr=io_lr, mode=args.io_mode, size=None if args.io_size is None else tuple(args.io_size),
        levels=args.io_levels, field_size=None if args.io_field_size is None else tuple(args.io_field_size),
        fine_steps=args.io_fine_steps, voxels=args.io_voxels,
        smoothness=Refinement().smoothness if args.io_smoothness is None else args.io_smoothness)
    return tag, model, refinement


def setup(args: argparse.Namespace) -> tuple[list[dict], Path]:
    """Threads and allocator as ``monai-icon register`` runs; the datalist's pairs (absolute paths) and the results
    file."""
    import torch

    from monai_icon.cpu_allocator import tune_cpu_allocator

    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as `monai-icon register` runs (one process: SyN's allocations are served the same way)
    datalist_path = Path(args.datalist)
    pairs = json.loads(datalist_path.read_text())[args.key][: args.pairs]
    base = datalist_path.parent
    pairs = [{k: str(base / v) if k.endswith(("image", "label")) else v for k, v in p.items()} for p in pairs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return pairs, out / "results.json"


def runners(args: argparse.Namespace) -> dict:
    """The methods of parsed arguments as ``name -> run(pair, work_dir)`` for :func:`evaluate`: the ICON row (with
    ``--model``; its model loaded once) and SyN (unless ``--no-syn``)."""
    tag, model, refinement = icon_method(args)
    out = {}
    if model is not None:
        out[tag] = lambda pair, work: run_icon(pair, model, refinement, work)
    if not args.no_syn:
        out["syn"] = lambda pair, work: run_syn(pair, work, args.threads, args.syn_transform)
    return out


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    pairs, results_file = setup(args)
    return evaluate(pairs, runners(args), results_file)


def evaluate(pairs: list[dict], runners: dict, results_file: Path) -> dict:
    """Every method of ``runners`` (``name -> run(pair, work_dir)``, giving the warped label and the seconds) on
    each pair in turn, in the order given (so that each method meets the same machine state, pair by pair); Dice
    per label by :func:`label_dice`. Rows are added to ``results_file`` (kept from earlier runs, written
    atomically); returns the results."""
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"pairs": {}, "rows": {}}
    rows: dict[str, list[dict]] = {}
    for i, pair in enumerate(pairs):
        fixed_label = _read_labels(pair["fixed_label"])
        labels = sorted(int(v) for v in np.unique(fixed_label) if v != 0)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            methods = {"unregistered": {"warped_label": _read_labels(pair["moving_label"]), "seconds": 0.0}}
            for name, runner in runners.items():
                methods[name] = runner(pair, work)
        for name, m in methods.items():
            dice = label_dice(m["warped_label"], fixed_label, labels)
            row = {"pair": i, "mean_dice": float(np.nanmean(list(dice.values()))), "seconds": m["seconds"],
                   "dice": dice, "folds_percent": m.get("folds_percent")}
            rows.setdefault(name, []).append(row)
            print(json.dumps({"method": name, **{k: v for k, v in row.items() if k != "dice"}}), flush=True)
    for name, per_pair in rows.items():
        folds = [r["folds_percent"] for r in per_pair if r["folds_percent"] is not None]
        results["rows"][name] = {
            "pairs": len(per_pair),
            "mean_dice": float(np.mean([r["mean_dice"] for r in per_pair])),
            "seconds_per_pair": float(np.mean([r["seconds"] for r in per_pair])),
            "folds_percent": float(np.mean(folds)) if folds else None,
            "per_pair": per_pair,
        }
    tmp = results_file.with_suffix(".partial")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(results_file)
    print("| method | pairs | mean label Dice | seconds per pair | folds (% of cells) |")
    print("|---|---|---|---|---|")
    for name, row in results["rows"].items():
        folds = "" if row["folds_percent"] is None else f"{row['folds_percent']:.3f}"
        print(f"| {name} | {row['pairs']} | {row['mean_dice']:.3f} | {row['seconds_per_pair']:.2f} | {folds} |")
    return results


if __name__ == "__main__":
    main()
