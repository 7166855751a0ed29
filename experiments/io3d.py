#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Settings study for 3D instance optimisation (target: refined label Dice >= 0.75 at <= 10 s per pair).

Registers the pairs of a datalist key (default ``validation_pairs``: choose settings there, never on the test
pairs) as files with :func:`monai_icon.apps.register_files` (as ``monai-icon register`` does) and scores the
warped labels on each fixed image's own grid with :func:`monai_icon.metrics.label_dice`, the Dice code of
``benchmarks/syn_vs_icon.py``. Beyond the options the command line has, it can change the LNCC window
(``--kernel``), which the model file names only as ``"lncc"``.

    python experiments/io3d.py --datalist runs/t1head_demo/datalist.json \\
        --model runs/t1head_demo/stage2/models/registration_model.pt --steps 50 --kernel 5 --tag k5

Appends one row per run to ``<out>/io3d.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--key", default="validation_pairs")
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--lmbda", type=float, default=4.0)
    p.add_argument("--regularizer", default="gradicon")
    p.add_argument("--similarity", default="lncc")
    p.add_argument("--kernel", type=int, default=None, help="LNCC window (voxels of the loss grid; default 7)")
    p.add_argument("--io-size", type=lambda t: [int(v) for v in t.split(",")], default=None)
    p.add_argument("--io-field-size", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="grid of the residual fields and the regulariser (default: --io-size or the network grid)")
    p.add_argument("--fine-steps", type=int, default=None, help="of --steps, the last this many on --io-size")
    p.add_argument("--reg-size", type=lambda t: tuple(int(v) for v in t.split(",")), default=None,
                   help="study only: evaluate the regulariser on this grid instead of the fields' grid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", required=True)
    p.add_argument("--out", default="runs/io3d")
    args = p.parse_args(argv)

    import nibabel as nib
    import torch

    from monai_icon.apps import load_registration_model, register_files
    from monai_icon.losses import StackedLNCCLoss
    from monai_icon.metrics import label_dice

    torch.set_num_threads(args.threads)
    if args.reg_size is not None:  # the loss is built inside register_images: set its regulariser grid there
        import monai_icon.apps.register as register_module

        class _Loss(register_module.ICONLoss):
            def __setattr__(self, key, value):
                if key == "regularizer_size" and value is not None:
                    value = args.reg_size
                super().__setattr__(key, value)

        register_module.ICONLoss = _Loss  # type: ignore[misc]
    datalist = Path(args.datalist)
    pairs = json.loads(datalist.read_text())[args.key][: args.pairs]
    model = load_registration_model(args.model, lmbda=args.lmbda, regularizer=args.regularizer,
                                    similarity=args.similarity)
    if args.kernel is not None:
        if args.similarity != "lncc":
            raise SystemExit("--kernel needs --similarity lncc")
        model.similarity = StackedLNCCLoss(spatial_dims=3, kernel_size=args.kernel, reduction="none")

    def read(path: str | Path) -> torch.Tensor:
        return torch.as_tensor(np.rint(np.asarray(nib.load(str(path)).dataobj)).astype(np.int64))

    rows = []
    for pair in pairs:
        files = {k: str(datalist.parent / v) for k, v in pair.items() if k.endswith(("image", "label"))}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "warped_label.nii.gz"
            summary = register_files(files["fixed_image"], files["moving_image"], model,
                                     moving_label=files["moving_label"], warped_label=out, io_steps=args.steps,
                                     io_lr=args.lr, io_mode="residual", io_size=args.io_size,
                                     io_levels=args.levels, io_field_size=args.io_field_size,
                                     io_fine_steps=args.fine_steps)
            warped = read(out)
        fixed = read(files["fixed_label"])
        labels = sorted(int(v) for v in torch.unique(fixed) if v != 0)
        dice = label_dice(warped, fixed, labels)
        rows.append({"pair_id": pair.get("pair_id"), "mean_dice": float(np.nanmean(list(dice.values()))),
                     "seconds": summary["seconds"], "folds_percent": summary["folds_percent"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"tag": args.tag, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tag")},
              "mean_dice": float(np.mean([r["mean_dice"] for r in rows])),
              "seconds_per_pair": float(np.mean([r["seconds"] for r in rows])),
              "folds_percent": float(np.mean([r["folds_percent"] for r in rows])), "rows": rows}
    print(f"{args.tag}: mean Dice {result['mean_dice']:.4f}, {result['seconds_per_pair']:.1f} s/pair, "
          f"folds {result['folds_percent']:.3f} %")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    file = out_dir / "io3d.json"
    previous = json.loads(file.read_text()) if file.is_file() else []
    tmp_file = file.with_suffix(".partial")
    tmp_file.write_text(json.dumps(previous + [result], indent=1))
    tmp_file.replace(file)
    return result


if __name__ == "__main__":
    main()
