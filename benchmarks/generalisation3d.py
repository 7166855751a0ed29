#!/usr/bin/env python
# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Generalisation of 3D registration to subjects and deformations that no training or selection used, against
ANTs SyN on the same pairs with the same Dice code.

Subjects (nothing is shipped or downloaded by this script; bring the two packages):

- **validation** (settings are chosen here), two skull-stripped brains: the MNI ICBM152 2009 template from the
  nilearn wheel (``pip download --no-deps nilearn``; the wheel's copy is already brain-masked) at 2 mm, its grey /
  white matter probability maps > 0.5 as labels 1 / 2 (© McConnell Brain Imaging Centre, Fonov et al.,
  NeuroImage 2011); and the INIA19 rhesus macaque template with its NeuroMaps labels (the 40 largest
  regions, relabelled 1-40; the atlas has 604) from Debian's
  ``mricron-data`` at 1 mm (Rohlfing et al., Front. Neuroinform. 2012), a brain of another size and shape.
  No subject with its skull is available offline for validation besides the test subject and the training one.
- **test** (reported once): the Colin27 single-subject head ``ch2`` and its skull-stripped ``ch2bet`` from Debian's
  ``mricron-data`` (``apt-get download mricron-data && dpkg-deb -x mricron-data_*.deb DIR``), at 2 mm, with the
  116 labels of the AAL atlas (Tzourio-Mazoyer et al., NeuroImage 2002) on the same grid.

Pairs: each pair is two copies of one subject, each under its own random transform from a generator that the
training code does not use (:func:`random_svf_transform`): a stationary velocity field of Gaussian-smoothed noise
(smoothing width uniform in 8-20 mm), integrated by scaling and squaring, scaled so that its largest displacement
is uniform in 2-8 mm, composed with a small affine map (rotations up to 4 degrees about each axis, scalings
within 4 %, shifts up to 3 mm). Images linearly, labels by nearest neighbour, on the subject's own 2 mm grid.

Methods, in one process, pair by pair (every method on a pair before the next pair), Dice per label on the **fixed
image's own grid** by one function (``syn_vs_icon.label_dice``) and seconds of the registration call on this
machine:
the unregistered pair; the network alone (``monai-icon register --model MODEL``); its test-time ensemble
(``--symmetric --flip-axes 0 --passes 2``), the same with the mirrored images in its first pass only
(``ensemble-flip1``: ``--flip-passes 1``) and without them (``symmetric``: ``--symmetric --passes 2``); the
recommended refinement (``--refine``); ANTs SyN
(``antspyx``, ``type_of_transform="SyNOnly"`` with its defaults, after no affine step: the pairs are already
roughly aligned, as the network's are; also ``"SyN"`` with ``--syn-transform SyN``).

    python benchmarks/generalisation3d.py prepare --nilearn-wheel wheels/nilearn-*.whl \\
        --mricron DIR/usr/share/mricron/templates --out runs/generalisation3d
    pip install antspyx   # a benchmark dependency only
    python benchmarks/generalisation3d.py run --data runs/generalisation3d --split validation \\
        --model bundle/knee3d_icon/models/brain_transfer_model.pt --out runs/generalisation3d/val_results
    python benchmarks/generalisation3d.py run --split test ...   # once, after every choice was made

    python benchmarks/generalisation3d.py figure --split test --model MODEL --ensemble --out FIGURE.png

``run`` writes ``<out>/results.json`` and prints a Markdown table with each method's share of SyN's Dice gain
(``(Dice - unregistered) / (SyN - unregistered)``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NILEARN = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
#: the rows of ``run``; those of ``ISOTROPIC`` also with ``--isotropic-grid`` as ``<name>-isotropic``
ISOTROPIC = ("network", "ensemble", "ensemble-flip1", "symmetric", "refine")
METHODS = (*ISOTROPIC, "refine-symmetric", "syn", *(f"{name}-isotropic" for name in ISOTROPIC))
SPLITS = {"validation": "validation_pairs", "test": "test_pairs"}


# --------------------------------------------------------------------------------------------- the deformations
def _gaussian_smooth(field: torch.Tensor, sigma_vox: np.ndarray) -> torch.Tensor:
    """Separable Gaussian smoothing of ``[B, C, X, Y, Z]`` with a per-axis width in voxels (replicate padding)."""
    for axis, sigma in enumerate(sigma_vox):
        radius = max(1, int(math.ceil(3 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=field.dtype)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        moved = field.movedim(2 + axis, -1)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        field = F.conv1d(flat, kernel[None, None]).reshape(shape).movedim(-1, 2 + axis)
    return field


def random_svf_transform(shape: tuple[int, int, int], spacing: np.ndarray, generator: torch.Generator,
                         max_displacement_mm: tuple[float, float] = (2.0, 8.0),
                         smoothing_mm: tuple[float, float] = (8.0, 20.0), rotate_degrees: float = 4.0,
                         scale: float = 0.04, shift_mm: float = 3.0) -> torch.Tensor:
    """Sampling points (voxel indices, ``[X, Y, Z, 3]``, float64) of a random smooth diffeomorphism composed with a
    small affine map: the output voxel ``p`` takes the input at ``A(p) + u(A(p))`` (module docstring)."""
    def uniform(low: float, high: float, *size: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*size, generator=generator, dtype=torch.float64)

    spacing_t = torch.as_tensor(spacing, dtype=torch.float64)
    # stationary velocity field (voxels), smoothed noise scaled to the drawn largest displacement, integrated
    sigma_mm = float(uniform(*smoothing_mm, 1))
    noise = torch.randn(1, 3, *shape, generator=generator, dtype=torch.float64)
    velocity = _gaussian_smooth(noise, sigma_mm / np.asarray(spacing, dtype=np.float64))
    velocity_mm = velocity * spacing_t.reshape(1, 3, 1, 1, 1)
    target = float(uniform(*max_displacement_mm, 1))
    velocity = velocity * (target / float(velocity_mm.norm(dim=1).max()))
    from monai.networks.blocks import DVF2DDF

    ddf = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(velocity.float()).double()  # voxels
    # the affine part about the volume centre, in millimetres
    angles = uniform(-1, 1, 3) * math.radians(rotate_degrees)
    c, s = torch.cos(angles), torch.sin(angles)
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]], dtype=torch.float64)
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]], dtype=torch.float64)
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]], dtype=torch.float64)
    matrix = rz @ ry @ rx @ torch.diag(1 + uniform(-1, 1, 3) * scale)
    shift = uniform(-1, 1, 3) * shift_mm
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    centre = (torch.tensor(shape, dtype=torch.float64) - 1) / 2
    mm = (grid - centre) * spacing_t
    points = ((mm @ matrix.T + shift) / spacing_t) + centre  # A(p), voxels
    # u at A(p): the displacement field sampled there (linear, border)
    u = _sample(ddf, points, "bilinear")[0].permute(1, 2, 3, 0)
    return points + u


def _sample(volume: torch.Tensor, points: torch.Tensor, mode: str) -> torch.Tensor:
    """``volume`` ``[B, C, X, Y, Z]`` at voxel ``points`` ``[X', Y', Z', 3]`` (border padding, align_corners)."""
    sizes = torch.tensor(volume.shape[2:], dtype=torch.float64)
    normalised = 2 * points / (sizes - 1) - 1
    grid = normalised.flip(-1)[None].to(volume.dtype)
    return F.grid_sample(volume, grid, mode=mode, padding_mode="border", align_corners=True)


def deform(image: np.ndarray, label: np.ndarray, points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The image (linear) and the label map (nearest) at the sampling ``points``."""
    img = torch.as_tensor(image, dtype=torch.float64)[None, None]
    lab = torch.as_tensor(label.astype(np.float64))[None, None]
    return (_sample(img, points, "bilinear")[0, 0].float().numpy(),
            _sample(lab, points, "nearest")[0, 0].round().numpy().astype(np.int16))


# ------------------------------------------------------------------------------------------------- the subjects
def _pool_image(data: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Average-pool by ``factor``; the affine follows (voxel centres of the pooled grid)."""
    pooled = F.avg_pool3d(torch.as_tensor(data, dtype=torch.float32)[None, None], factor)[0, 0].numpy()
    shift = np.eye(4)
    shift[:3, 3] = (factor - 1) / 2.0
    return pooled, affine @ shift @ np.diag([factor, factor, factor, 1.0])


def _pool_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """The most frequent label of each ``factor``-cube (ties: the smaller label; background counts)."""
    source = torch.as_tensor(labels.astype(np.int64))
    best_count = best_label = None
    for value in torch.unique(source).tolist():
        count = F.avg_pool3d((source == value).float()[None, None], factor)[0, 0]
        if best_count is None:
            best_count, best_label = count, torch.full_like(count, value, dtype=torch.int64)
        else:
            better = count > best_count
            best_count = torch.where(better, count, best_count)
            best_label = torch.where(better, torch.full_like(best_label, value), best_label)
    assert best_label is not None
    return best_label.numpy().astype(np.int16)


def _largest_labels(labels: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` largest non-zero labels relabelled ``1 .. count`` by decreasing size; the others 0."""
    values, sizes = np.unique(labels[labels != 0], return_counts=True)
    keep = values[np.argsort(-sizes, kind="stable")[:count]]
    out = np.zeros_like(labels)
    for new, value in enumerate(keep, start=1):
        out[labels == value] = new
    return out


def load_subjects(nilearn_wheel: Path, mricron: Path) -> dict[str, dict]:
    """The four subjects: ``{name: {"image", "label", "affine", "split"}}``."""
    if not nilearn_wheel.is_file():
        raise FileNotFoundError(f"nilearn wheel not found: {nilearn_wheel} (pip download --no-deps nilearn)")
    if not (mricron / "ch2.nii.gz").is_file():
        raise FileNotFoundError(f"{mricron} has no ch2.nii.gz (extract Debian's mricron-data package)")
    import io

    def member(name: str) -> nib.Nifti1Image:
        with zipfile.ZipFile(nilearn_wheel) as archive:
            data = archive.read(NILEARN.format(name))
        return nib.Nifti1Image.from_bytes(__import__("gzip").decompress(data)) if data[:2] == b"\x1f\x8b" \
            else nib.Nifti1Image.from_stream(io.BytesIO(data))

    t1, gm, wm = member("t1"), member("gm"), member("wm")
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    gm_data, wm_data = (np.asarray(m.dataobj, dtype=np.float32) / 255.0 for m in (gm, wm))  # stored as 0..255
    mni_labels = np.where(gm_data > 0.5, 1, 0) + np.where(wm_data > 0.5, 2, 0)
    mni_labels[mni_labels == 3] = 2
    subjects = {}
    mni_image, mni_affine = _pool_image(t1_data, t1.affine, 2)
    mni_label = _pool_labels(mni_labels, 2)
    subjects["mni152_brain"] = {"image": mni_image, "label": mni_label, "affine": mni_affine, "split": "validation"}
    macaque = nib.load(str(mricron / "inia19-t1-brain.nii.gz"))
    macaque_labels = nib.load(str(mricron / "inia19-NeuroMaps.nii.gz"))
    image, affine = _pool_image(np.asarray(macaque.dataobj, dtype=np.float32), macaque.affine, 2)
    macaque_label = _largest_labels(_pool_labels(np.asarray(macaque_labels.dataobj), 2), 40)
    subjects["inia19_brain"] = {"image": image, "label": macaque_label,
                                "affine": affine, "split": "validation"}
    aal = nib.load(str(mricron / "aal.nii.gz"))
    colin_label = _pool_labels(np.asarray(aal.dataobj), 2)
    for name, file in (("colin27_head", "ch2.nii.gz"), ("colin27_brain", "ch2bet.nii.gz")):
        volume = nib.load(str(mricron / file))
        if not np.allclose(volume.affine, aal.affine) or volume.shape != aal.shape:
            raise ValueError(f"{file} and aal.nii.gz are not on one grid.")
        image, affine = _pool_image(np.asarray(volume.dataobj, dtype=np.float32), volume.affine, 2)
        subjects[name] = {"image": image, "label": colin_label, "affine": affine, "split": "test"}
    return subjects


def prepare(nilearn_wheel: Path, mricron: Path, out: Path, pairs_per_subject: int = 6, seed: int = 2024) -> Path:
    """Write every pair's files under ``out/pairs`` and ``out/datalist.json`` (keys ``validation_pairs``,
    ``test_pairs``; paths relative to ``out``)."""
    subjects = load_subjects(nilearn_wheel, mricron)
    generator = torch.Generator().manual_seed(seed)
    datalist: dict[str, list] = {key: [] for key in SPLITS.values()}
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    for name, subject in subjects.items():
        spacing = np.sqrt((subject["affine"][:3, :3] ** 2).sum(0))
        for i in range(pairs_per_subject):
            record = {"pair_id": f"{name}_{i}", "subject": name}
            for role in ("moving", "fixed"):
                points = random_svf_transform(subject["image"].shape, spacing, generator)
                image, label = deform(subject["image"], subject["label"], points)
                for kind, array in (("image", image), ("label", label)):
                    rel = f"pairs/{name}_{i}_{role}_{kind}.nii.gz"
                    tmp = out / (rel + ".partial.nii.gz")
                    nib.save(nib.Nifti1Image(array, subject["affine"]), str(tmp))
                    tmp.replace(out / rel)
                    record[f"{role}_{kind}"] = rel
            datalist[SPLITS[subject["split"]]].append(record)
            print(f"{record['pair_id']}: written", flush=True)
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


# ------------------------------------------------------------------------------------------------ the methods
def run(data: Path, split: str, model: str, out: Path, syn_transform: str = "SyNOnly", pairs: int | None = None,
        threads: int = 2, methods: tuple[str, ...] = ("network", "ensemble", "refine", "syn")) -> dict:
    """Every method on the split's pairs in one process, pair by pair (on each pair every method in turn, so that
    each meets the same state of the machine: ratios of seconds between methods hold even where the machine's speed
    drifts during the run); returns the results."""
    import syn_vs_icon

    from monai_icon.apps.presets import RECOMMENDED_ENSEMBLE

    key = SPLITS[split]
    base = ["--datalist", str(data / "datalist.json"), "--key", key, "--out", str(out), "--threads", str(threads)]
    if pairs is not None:
        base += ["--pairs", str(pairs)]
    ensemble = ["--symmetric", "--flip-axes", ",".join(str(a) for a in RECOMMENDED_ENSEMBLE["flip_axes"]),
                "--passes", str(RECOMMENDED_ENSEMBLE["passes"])]
    rows = {"network": ["--model", model, "--tag", "network", "--no-syn"],
            "ensemble": ["--model", model, "--tag", "ensemble", "--no-syn", *ensemble],
            "ensemble-flip1": ["--model", model, "--tag", "ensemble-flip1", "--no-syn", *ensemble,
                               "--flip-passes", "1"],
            "symmetric": ["--model", model, "--tag", "symmetric", "--no-syn", "--symmetric", "--passes",
                          str(RECOMMENDED_ENSEMBLE["passes"])],
            "refine": ["--model", model, "--tag", "refine", "--no-syn", "--refine"],
            "refine-symmetric": ["--model", model, "--tag", "refine-symmetric", "--no-syn", "--refine", "symmetric"],
            "syn": ["--syn-transform", syn_transform]}
    for name in ISOTROPIC:  # on network grids shaped like the fixed images
        rows[f"{name}-isotropic"] = [*rows[name][:3], f"{name}-isotropic", *rows[name][4:], "--isotropic-grid"]
    parsed = {name: syn_vs_icon.parser().parse_args(base + rows[name]) for name in methods}
    pair_list, results_file = syn_vs_icon.setup(next(iter(parsed.values())))
    runners: dict = {}
    for args in parsed.values():  # the ICON rows have --no-syn, the SyN row no --model
        runners.update(syn_vs_icon.runners(args))
    results = syn_vs_icon.evaluate(pair_list, runners, results_file)
    table = summarise(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


def summarise(results: dict) -> str:
    """A Markdown table of the rows with each method's share of SyN's Dice gain over the unregistered pairs."""
    rows = results["rows"]
    base = rows.get("unregistered", {}).get("mean_dice")
    syn = next((rows[k]["mean_dice"] for k in rows if k.startswith("syn")), None)
    lines = ["| method | pairs | mean label Dice | share of SyN's gain | seconds per pair | folds (% of cells) |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        share = ""
        if base is not None and syn is not None and syn != base and name != "unregistered":
            share = f"{100 * (row['mean_dice'] - base) / (syn - base):.0f} %"
        folds = "" if row.get("folds_percent") is None else f"{row['folds_percent']:.4f}"
        seconds = "" if name == "unregistered" else f"{row['seconds_per_pair']:.2f}"
        lines.append(f"| {name} | {row['pairs']} | {row['mean_dice']:.3f} | {share} | {seconds} | {folds} |")
    return "\n".join(lines)


def figure(data: Path, split: str, model_path: str, out: Path, ensemble: bool = False, pairs: int = 2) -> Path:
    """Draw moving / fixed / warped / deformed grid (the middle axial slice of the model's RAS grid) for one pair
    of each subject of the split (at most ``pairs`` rows), registered by the model (optionally its ensemble)."""
    from monai_icon.apps import load_registration_model
    from monai_icon.apps.physical import load_image, to_network_grid
    from monai_icon.apps.presets import RECOMMENDED_ENSEMBLE
    from monai_icon.networks import ensemble_network
    from monai_icon.networks.maps import identity_grid, interpolate
    from monai_icon.networks.registration_net import register_one_way
    from monai_icon.visualize import save_registration_figure

    model = load_registration_model(model_path)
    if ensemble:
        model.network = ensemble_network(model.network, RECOMMENDED_ENSEMBLE["symmetric"],
                                         RECOMMENDED_ENSEMBLE["flip_axes"], passes=RECOMMENDED_ENSEMBLE["passes"])
    records = json.loads((data / "datalist.json").read_text())[SPLITS[split]]
    chosen = list({r["subject"]: r for r in reversed(records)}.values())[::-1][:pairs]
    moving, fixed = ([to_network_grid(load_image(data / r[f"{role}_image"]), model.spatial_size, model.axcodes,
                                      model.percentiles).as_tensor() for r in chosen] for role in ("moving", "fixed"))
    moving_t, fixed_t = torch.stack(moving), torch.stack(fixed)
    model.network.eval()
    with torch.no_grad():
        phi = register_one_way(model.network, moving_t, fixed_t)
        grid = phi(identity_grid(model.spatial_size).repeat(len(chosen), *([1] * (len(model.spatial_size) + 1))))
        warped = interpolate(moving_t, grid)
    return save_registration_figure(out, moving_t, fixed_t, warped, grid)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the pairs and their datalist")
    prep.add_argument("--nilearn-wheel", required=True, type=Path)
    prep.add_argument("--mricron", required=True, type=Path, help="mricron-data's templates folder")
    prep.add_argument("--out", default=Path("runs/generalisation3d"), type=Path)
    prep.add_argument("--pairs-per-subject", type=int, default=6)
    prep.add_argument("--seed", type=int, default=2024)
    go = sub.add_parser("run", help="register the pairs of one split with every method")
    go.add_argument("--data", default=Path("runs/generalisation3d"), type=Path)
    go.add_argument("--split", choices=sorted(SPLITS), required=True)
    go.add_argument("--model", required=True, help="model file or bundle folder (monai-icon register --model)")
    go.add_argument("--out", required=True, type=Path)
    go.add_argument("--syn-transform", default="SyNOnly", choices=["SyNOnly", "SyN"])
    go.add_argument("--pairs", type=int, default=None, help="only the first N pairs")
    go.add_argument("--threads", type=int, default=2)
    go.add_argument("--methods", default="network,ensemble,refine,syn",
                    help="comma-separated subset of network, ensemble, symmetric, refine, refine-symmetric, syn, "
                         "and of network, ensemble, symmetric, refine with -isotropic (--isotropic-grid)")
    fig = sub.add_parser("figure", help="draw moving / fixed / warped / deformed grid for one pair per subject")
    fig.add_argument("--data", default=Path("runs/generalisation3d"), type=Path)
    fig.add_argument("--split", choices=sorted(SPLITS), required=True)
    fig.add_argument("--model", required=True)
    fig.add_argument("--ensemble", action="store_true", help="the recommended test-time ensemble")
    fig.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    if args.command == "figure":
        print(figure(args.data, args.split, args.model, args.out, args.ensemble))
        return None
    if args.command == "prepare":
        print(prepare(args.nilearn_wheel, args.mricron, args.out, args.pairs_per_subject, args.seed))
        return None
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}")
    return run(args.data, args.split, args.model, args.out, args.syn_transform, args.pairs, args.threads, methods)


if __name__ == "__main__":
    main()
