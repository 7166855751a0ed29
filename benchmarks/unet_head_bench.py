"""The CPU backend's fused U-Net output (``fused_unet_head``) against the layers it replaces.

The 3D brain models' U-Nets end with a transposed convolution to the full grid and a 3-channel output convolution;
``monai_icon.backend.unet_output`` computes both as one convolution on the coarse grid when the network is evaluated
without autograd. This script times, with the setting off and on in alternating rounds (medians):

- one U-Net of ``brain_transfer_model.pt`` on a 48×56×48 grid (an isotropic brain grid halved), batch 1, 2 and 4
  (one direction, both directions, both directions with mirrored images), and the largest difference of the outputs;
- with ``--data`` (the folder of ``benchmarks/generalisation3d.py prepare``), ``--isotropic-grid --ensemble
  --flip-passes 1`` on the validation pairs (seconds of the registration call, as the benchmark counts them).

    python benchmarks/unet_head_bench.py --rounds 7 --data runs/generalisation3d \
        --out docs/results/knee3d/unet_head_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_icon.backend import CPUBackend, tune_cpu_allocator, use_backend  # noqa: E402

MODEL = ROOT / "bundle/knee3d_icon/models/brain_transfer_model.pt"
VARIANTS = {"layers": CPUBackend("auto", fast_sampler=False, compiled_lncc=False, fused_unet_head=False),
            "fused": CPUBackend("auto", fast_sampler=False, compiled_lncc=False)}


def _seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_rows(rounds: int, repeats: int = 3, size: tuple[int, ...] = (48, 56, 48),
              batches: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    from monai_icon.apps import load_registration_model
    from monai_icon.networks.nets import UNet
    from monai_icon.networks.nets.unet import unet_padding

    model = load_registration_model(MODEL, isotropic=True)
    unet = next(m for m in model.network.modules() if isinstance(m, UNet)).eval()
    rows = []
    for batch in batches:
        x = torch.rand(batch, 2, *size, generator=torch.Generator().manual_seed(batch))
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        outputs = {}
        with torch.no_grad(), unet_padding(unet, 1):
            for r in range(rounds):
                for name in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
                    with use_backend(VARIANTS[name], "cpu"):
                        outputs[name] = unet(x)
                        times[name].append(_seconds(lambda: unet(x), repeats))
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        case = f"U-Net {'x'.join(map(str, size))}, batch {batch}"
        rows.append({"case": case, **{f"{k}_ms": v for k, v in ms.items()}, "ratio": ms["fused"] / ms["layers"],
                     "max_difference": float((outputs["fused"] - outputs["layers"]).abs().max()),
                     "max_value": float(outputs["layers"].abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ensemble_rows(data: Path, rounds: int) -> list[dict]:
    from monai_icon.apps import load_registration_model
    from monai_icon.apps.physical import load_image
    from monai_icon.apps.register import register_images
    from monai_icon.networks import ensemble_network

    pairs = json.loads((data / "datalist.json").read_text())["validation_pairs"]
    images = [(load_image(data / p["fixed_image"], "fixed image"), load_image(data / p["moving_image"], "moving image"))
              for p in pairs]
    model = load_registration_model(MODEL, isotropic=True)
    model.network = ensemble_network(model.network, True, [0], passes=2, flip_passes=1)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
            with use_backend(VARIANTS[name], "cpu"):
                for fixed, moving in images:
                    start = time.perf_counter()
                    register_images(model, fixed, moving)
                    seconds[name].append(time.perf_counter() - start)
    med = {name: statistics.median(s) for name, s in seconds.items()}
    row = {"case": f"--isotropic-grid --ensemble --flip-passes 1, {len(images)} validation pairs x {rounds} rounds",
           **{f"{k}_s_per_pair": v for k, v in med.items()}, "ratio": med["fused"] / med["layers"]}
    print(json.dumps(row), flush=True)
    return [row]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--data", type=Path, default=None, help="the generalisation benchmark's folder (with datalist.json)")
    p.add_argument("--ensemble-rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    tune_cpu_allocator()  # as monai-icon register runs
    rows = unet_rows(args.rounds)
    if args.data is not None:
        rows += ensemble_rows(args.data, args.ensemble_rounds)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
