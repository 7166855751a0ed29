#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Refinement settings compared on the validation pairs of ``benchmarks/generalisation3d.py`` (never its test
pairs), in one process: each variant is a JSON object of :class:`monai_icon.engines.instance_optimisation.Refinement`
fields, plus optionally ``"kernel"`` (the LNCC window), ``"ensemble"`` (keywords of
:func:`monai_icon.networks.ensemble_network`, the network the refinement starts from) and ``"compose"`` (``true``: the
one-way refinement composes its residual with the network's map instead of adding it to the displacement,
``refine_one_way(compose=True)``; this script alone switches it, by wrapping the function for that variant). Label
Dice on the fixed grid with the benchmark's Dice code, folds and seconds per pair as ``benchmarks/syn_vs_icon.py``
measures them.

    python experiments/fast_refine.py --variants '[{"mode": "one-way", "steps": 28, "fine_steps": 4, "levels": 4,
        "lr": 7e-3, "voxels": 614400}]' [--pairs 0,1,6,7]

Appends one JSON line per variant to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", default="runs/generalisation3d/datalist.json")
    p.add_argument("--model", default="bundle/knee3d_icon/models/brain_transfer_model.pt")
    p.add_argument("--variants", required=True, help="JSON list of settings")
    p.add_argument("--pairs", default="all", help="'all' or a comma list of validation pair indices")
    p.add_argument("--out", default="runs/fast_refine/results.jsonl")
    args = p.parse_args(argv)

    import torch

    from syn_vs_icon import _read_labels, label_dice
    import monai_icon.apps.register as register_module
    from monai_icon.apps import load_registration_model, register_files
    from monai_icon.backend import tune_cpu_allocator
    from monai_icon.engines.instance_optimisation import Refinement, refine_one_way
    from monai_icon.losses import get_similarity
    from monai_icon.networks import ensemble_network

    torch.set_num_threads(2)
    tune_cpu_allocator()
    datalist = Path(args.datalist)
    pairs = json.loads(datalist.read_text())["validation_pairs"]
    if args.pairs != "all":
        pairs = [pairs[int(i)] for i in args.pairs.split(",")]
    pairs = [{k: str(datalist.parent / v) if k.endswith(("image", "label")) else v for k, v in q.items()}
             for q in pairs]
    model = load_registration_model(args.model)
    network = model.network
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in json.loads(args.variants):
        settings = dict(variant)
        ensemble = settings.pop("ensemble", None)
        compose = bool(settings.pop("compose", False))
        register_module.refine_one_way = functools.partial(refine_one_way, compose=compose)
        model.network = network if ensemble is None else ensemble_network(network, **ensemble)
        model.similarity = get_similarity("lncc", model.spatial_dims, kernel_size=settings.pop("kernel", 5))
        for key in ("size", "field_size"):
            if settings.get(key) is not None:
                settings[key] = tuple(settings[key])
        refinement = Refinement(**settings)
        rows = []
        for pair in pairs:
            fixed_label = _read_labels(pair["fixed_label"])
            labels = sorted(int(v) for v in np.unique(fixed_label) if v != 0)
            with tempfile.TemporaryDirectory() as tmp:
                warped = Path(tmp) / "label.nii.gz"
                summary = register_files(pair["fixed_image"], pair["moving_image"], model,
                                         moving_label=pair["moving_label"], warped_label=warped, refinement=refinement)
                dice = label_dice(_read_labels(warped), fixed_label, labels)
            rows.append({"pair": pair["pair_id"], "dice": float(np.nanmean(list(dice.values()))),
                         "seconds": summary["seconds"], "folds": summary["folds_percent"]})
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "seconds", "folds")}
        with out.open("a") as f:
            f.write(json.dumps({"variant": variant, **mean, "pairs": len(rows), "per_pair": rows}) + "\n")
        print(json.dumps({"variant": variant, **{k: round(v, 4) for k, v in mean.items()}}), flush=True)


if __name__ == "__main__":
    main()
