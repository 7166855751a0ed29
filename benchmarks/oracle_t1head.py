# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The best label Dice any registration can reach on the T1-head demo pairs: the known answer.

``monai_icon.data.write_deformed_copies`` makes copy ``i`` as ``head(x + d_i(x))`` (labels by nearest neighbour).
For a pair (moving ``i``, fixed ``j``) the exact map is ``psi = (id + d_i)^-1 o (id + d_j)``, found here by the
fixed-point iteration ``y <- x + d_j(x) - d_i(y)``. Warping the moving label map with ``psi`` (nearest neighbour,
as every method's labels are warped) and scoring it with the same Dice code as ``benchmarks/syn_vs_icon.py`` gives
the ceiling that the labels' own resampling leaves; no method can be expected above it.

    python benchmarks/oracle_t1head.py --datalist runs/t1head_demo/datalist.json --key validation_pairs

Regenerates the deformations from the demo's seed (``--num-copies 16 --seed 0 --deformation-mm 6``, as
``scripts/run_knee3d_demo.sh`` writes them) and checks that they reproduce the label files before scoring.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def regenerate_ddfs(num_copies: int, deformation_mm: float, seed: int):
    """The voxel DDFs ``[3, *shape]`` of ``write_deformed_copies(num_copies, deformation_mm, seed)``, in order."""
    import nibabel as nib
    import torch

    from monai_icon.data import embedded_t1_head, random_smooth_ddf

    image_path, _ = embedded_t1_head()
    src = nib.load(str(image_path))
    spacing = np.asarray(src.header.get_zooms()[:3], dtype=np.float64)
    generator = torch.Generator().manual_seed(seed)
    ddfs = []
    for _ in range(num_copies):
        ddfs.append(random_smooth_ddf(tuple(src.shape[:3]), spacing, deformation_mm, generator))
        torch.empty(()).uniform_(np.log(0.8), np.log(1.25), generator=generator)  # the copy's gamma draw
    return ddfs


def exact_pair_ddf(ddf_moving, ddf_fixed, iterations: int = 50):
    """Voxel DDF of ``(id + d_m)^-1 o (id + d_f)`` by fixed-point iteration; returns it and the final residual."""
    from monai.networks.blocks import Warp

    warp = Warp("bilinear", "border")
    target = ddf_fixed[None]  # y - x must equal d_f(x) - d_m(y)
    u = target.clone()
    for _ in range(iterations):
        u = target - warp(ddf_moving[None], u)  # d_m sampled at y = x + u
    residual = float((u + warp(ddf_moving[None], u) - target).abs().max())
    return u[0], residual


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datalist", required=True)
    p.add_argument("--key", default="validation_pairs")
    p.add_argument("--num-copies", type=int, default=16)
    p.add_argument("--deformation-mm", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the per-pair results here (JSON)")
    args = p.parse_args(argv)

    import nibabel as nib
    import torch
    from monai.networks.blocks import Warp

    from monai_icon.data import embedded_t1_head
    from monai_icon.metrics import label_dice

    datalist = Path(args.datalist)
    pairs = json.loads(datalist.read_text())[args.key]
    ddfs = regenerate_ddfs(args.num_copies, args.deformation_mm, args.seed)
    _, label_path = embedded_t1_head()
    head_labels = torch.as_tensor(np.asarray(nib.load(str(label_path)).dataobj).astype(np.float32))
    nearest = Warp("nearest", "border")

    def copy_index(path: str) -> int:
        return int(Path(path).name.split("_")[0]) - 9100000

    def read(path: str) -> torch.Tensor:
        return torch.as_tensor(np.asarray(nib.load(str(datalist.parent / path)).dataobj).astype(np.int64))

    rows = []
    for pair in pairs:
        m, f = copy_index(pair["moving_label"]), copy_index(pair["fixed_label"])
        moving, fixed = read(pair["moving_label"]), read(pair["fixed_label"])
        for index, stored in ((m, moving), (f, fixed)):  # the regenerated deformation must give the stored file
            again = nearest(head_labels[None, None], ddfs[index][None])[0, 0].round().long()
            if not torch.equal(again, stored):
                raise RuntimeError(f"copy {index}: regenerated labels differ from {pair['moving_label']}; "
                                   "wrong --num-copies/--seed/--deformation-mm?")
        u, residual = exact_pair_ddf(ddfs[m], ddfs[f])
        warped = nearest(moving[None, None].float(), u[None])[0, 0].round().long()
        labels = sorted(int(v) for v in torch.unique(fixed) if v != 0)
        exact = label_dice(warped, fixed, labels)
        before = label_dice(moving, fixed, labels)
        rows.append({"pair_id": pair.get("pair_id"), "before": float(np.nanmean(list(before.values()))),
                     "exact_map": float(np.nanmean(list(exact.values()))), "inverse_residual_voxels": residual,
                     "dice_exact": exact})
        print(f"{rows[-1]['pair_id']}: before {rows[-1]['before']:.3f}  exact map {rows[-1]['exact_map']:.3f}  "
              f"(inverse residual {residual:.1e} voxels)")
    summary = {"pairs": len(rows), "before": float(np.mean([r["before"] for r in rows])),
               "exact_map": float(np.mean([r["exact_map"] for r in rows]))}
    print(f"mean over {len(rows)} {args.key}: before {summary['before']:.3f}, exact map {summary['exact_map']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return summary


if __name__ == "__main__":
    main()
