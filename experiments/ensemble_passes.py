#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Cheaper forms of the two-pass test-time ensemble on ``--isotropic-grid``, compared on the validation pairs of
``benchmarks/generalisation3d.py`` (never its test pairs), the variants run pair by pair in one process
(``benchmarks/syn_vs_icon.evaluate``):

- ``full``: ``--symmetric --flip-axes 0 --passes 2`` (both passes with the mirrored images: 4 estimates each);
- ``full-inv3``: the same with 3 fixed-point iterations per inverse instead of 6;
- ``flip-first``: the mirrored images in the first pass only (4 estimates, then 2);
- ``flip-first-inv3``: that with 3 iterations per inverse;
- ``symmetric``: ``--symmetric --passes 2`` (2 estimates per pass);
- ``full-grid`` and ``flip-first-inv3-grid``: ``full`` and ``flip-first-inv3`` with the passes composed on the
  ensemble's grid (one displacement field) instead of exactly;
- ``ensemble`` and ``ensemble-flip1``: ``monai_icon.networks.ensemble_network`` as ``--ensemble`` and ``--ensemble
  --flip-passes 1`` run it (passes composed on the grid, 3 iterations per inverse);
- ``symmetric3`` and ``symmetric4``: ``--symmetric --passes 3`` and ``--passes 4`` (no mirrored images; 6 and 8 network
  evaluations per pair, as many as ``ensemble-flip1`` and ``ensemble``).

``--syn`` adds ANTs SyN on the same pairs (the share of SyN's time is steadier than seconds on a shared machine).

``--spatial-size`` replaces the model's grid, whose voxel count sets the size of the isotropic grid (e.g. ``96,64,100``:
about 614,000 voxels instead of 128x64x128's 1,048,576).

    python experiments/ensemble_passes.py --data runs/generalisation3d --out runs/ensemble_passes

The results are in ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# name: (flip axes of pass 1, flip axes of pass 2, iterations per inverse[, composition on the grid]), or the
# keywords of ensemble_network(symmetric=True, ...)
VARIANTS = {
    "full": ([0], [0], 6),
    "full-inv3": ([0], [0], 3),
    "flip-first": ([0], [], 6),
    "flip-first-inv3": ([0], [], 3),
    "symmetric": ([], [], 6),
    "full-grid": ([0], [0], 6, True),
    "flip-first-inv3-grid": ([0], [], 3, True),
    "ensemble": {"flip_axes": [0], "passes": 2},
    "ensemble-flip1": {"flip_axes": [0], "passes": 2, "flip_passes": 1},
    "symmetric3": {"passes": 3},
    "symmetric4": {"passes": 4},
}


def two_pass(block, first, second, iterations, on_grid=False):
    """Two ensemble passes with the mirrored images along ``first`` / ``second``, composed exactly or on the grid."""
    from monai_icon.networks import RegistrationNet, TestTimeEnsemble
    from monai_icon.networks.blocks import TwoStep

    one = TestTimeEnsemble(block, True, first, iterations)
    two = TestTimeEnsemble(block, True, second, iterations)
    return RegistrationNet(TwoStep(one, two, resample=on_grid))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", default=str(ROOT / "bundle/knee3d_icon/models/brain_transfer_model.pt"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--spatial-size", default=None, help="replace the model's grid, e.g. 96,64,100")
    p.add_argument("--syn", action="store_true", help="ANTs SyN (SyNOnly) on the same pairs, after the variants")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import syn_vs_icon

    from monai_icon.networks import ensemble_network

    base = ["--datalist", str(args.data / "datalist.json"), "--key", "validation_pairs", "--model", args.model,
            "--isotropic-grid", "--no-syn", "--out", str(args.out)]
    base += ["--pairs", str(args.pairs)] if args.pairs else []
    parsed = syn_vs_icon.parser().parse_args(base)
    _, model, refinement = syn_vs_icon.icon_method(parsed)
    if args.spatial_size:
        from monai_icon.apps import load_registration_model

        size = [int(v) for v in args.spatial_size.split(",")]
        model = load_registration_model(args.model, spatial_size=size, isotropic=True)
    pairs, results_file = syn_vs_icon.setup(parsed)
    block = model.network.block
    runners = {}
    for name in args.variants:
        variant = copy.copy(model)
        setting = VARIANTS[name]
        variant.network = (ensemble_network(block, True, **setting) if isinstance(setting, dict)
                           else two_pass(block, *setting))
        runners[name] = (lambda m: lambda pair, work: syn_vs_icon.run_icon(pair, m, refinement, work))(variant)
    if args.syn:
        runners["syn"] = lambda pair, work: syn_vs_icon.run_syn(pair, work, parsed.threads, "SyNOnly")
    syn_vs_icon.evaluate(pairs, runners, results_file)


if __name__ == "__main__":
    main()
