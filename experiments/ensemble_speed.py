#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Two speed settings of the test-time ensemble compared on the validation pairs of
``benchmarks/generalisation3d.py`` (never its test pairs), each row through ``benchmarks/syn_vs_icon.py`` in one
process, the variants alternating:

- ``batch``: :class:`monai_icon.networks.TestTimeEnsemble` with and without ``batch_estimates`` (the block once on
  the stacked reflected and swapped pairs, or once per pair), on the model's grid and with ``--isotropic-grid``;
  two rounds;
- ``padding``: with ``--isotropic-grid``, the U-Nets padding their input to multiples of 32 (their default), 16 or
  8 (what the grid's sizes already are: no padding, as ``monai-icon register --isotropic-grid`` runs them), for the
  network alone and the ensemble.

    python experiments/ensemble_speed.py batch --data runs/generalisation3d --out runs/ensemble_batch
    python experiments/ensemble_speed.py padding --data runs/generalisation3d --out runs/ensemble_padding

The variants are forced by wrapping the constructors (the command line has no switch for them); the results are
in ``OUT/results.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

ENSEMBLE = ["--symmetric", "--flip-axes", "0", "--passes", "2"]


@contextmanager
def forced(cls: type, attribute: str, value) -> Iterator[None]:
    """Every ``cls`` built in this context gets ``attribute = value`` after its own ``__init__``."""
    original = cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        setattr(self, attribute, value)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


@contextmanager
def forced_padding(value: int) -> Iterator[None]:
    """U-Nets pad to ``value`` even inside the register call's ``unet_padding`` context."""
    import monai_icon.apps.register as register

    original = register.unet_padding
    register.unet_padding = lambda network, _: original(network, value)
    try:
        yield
    finally:
        register.unet_padding = original


def main(argv=None) -> None:
    import generalisation3d
    import syn_vs_icon

    from monai_icon.networks import TestTimeEnsemble

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparison", choices=["batch", "padding"])
    p.add_argument("--data", type=Path, required=True, help="the benchmark's folder (its prepare --out)")
    p.add_argument("--model", default=str(ROOT / "bundle/knee3d_icon/models/brain_transfer_model.pt"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    base = ["--datalist", str(args.data / "datalist.json"), "--key", "validation_pairs", "--out", str(args.out),
            "--threads", "2", "--model", args.model, "--no-syn"]
    results: dict = {}
    if args.comparison == "batch":
        for repeat in range(2):
            for batched in (False, True):
                for isotropic in (False, True):
                    tag = (f"ensemble{'-isotropic' if isotropic else ''}-{'batched' if batched else 'sequential'}"
                           f"-{repeat}")
                    with forced(TestTimeEnsemble, "batch_estimates", batched):
                        results = syn_vs_icon.main(base + ["--tag", tag, *ENSEMBLE]
                                                   + (["--isotropic-grid"] if isotropic else []))
    else:
        for method, extra in (("network", []), ("ensemble", ENSEMBLE)):
            for multiple in (32, 16, 8):
                with forced_padding(multiple):
                    results = syn_vs_icon.main(base + ["--tag", f"{method}-isotropic-pad{multiple}",
                                                       "--isotropic-grid", *extra])
    table = generalisation3d.summarise(results)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
