#!/usr/bin/env python
"""Write the bundle's sample inference pairs: NIfTI files of embedded MNIST test fives and
bundle/mnist_icon/sample_data/pairs.json.

python scripts/make_sample_pairs.py [--out bundle/mnist_icon/sample_data] [--pairs 4]
"""

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_icon.data import MNISTFivesDataset, RandomPairDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bundle/mnist_icon/sample_data")
    p.add_argument("--pairs", type=int, default=4)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = MNISTFivesDataset("test")
    pairs = RandomPairDataset(test, args.pairs, seed=0)
    datalist = []
    for k in range(args.pairs):
        item = pairs[k]
        names = {}
        for role in ("moving", "fixed"):
            index = item[f"{role}_index"]
            name = f"mnist5_test{index:03d}.nii.gz"
            image = item[f"{role}_image"][0].numpy().astype(np.float32)
            nib.save(nib.Nifti1Image(image, np.eye(4)), out / name)
            names[f"{role}_image"] = name
        datalist.append(names)
    (out / "pairs.json").write_text(json.dumps({"pairs": datalist}, indent=2) + "\n")
    print(f"wrote {args.pairs} pairs to {out}")


if __name__ == "__main__":
    main()
