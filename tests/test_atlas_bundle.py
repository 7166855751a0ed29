"""Atlas-based segmentation: the module, the knee atlas bundle run by MONAI, and MONAI Label serving it."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import ROOT, run_bundle
from monai_icon.apps import AtlasSegmentation
from monai_icon.data import KneeAnatomy, knee_affine, render_knee
from monai_icon.losses import ICONLoss
from monai_icon.networks import multistep_registration

BUNDLE = ROOT / "bundle" / "knee_atlas_segmentation"
TINY = {"spatial_dims": 3, "coarse_steps": 1, "coarse_factor": 2, "fine_steps": 1, "freeze_coarse": False,
        "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
# the atlas' physical box (PIR 64 x 64 x 32 at 2.1 x 2.1 x 3.75 mm) stored as RAS 40 x 96 x 96 at 3 x 1.4 x 1.4 mm
USER_SHAPE, USER_AFFINE = (40, 96, 96), knee_affine((40, 96, 96), (3.0, 1.4, 1.4), "RAS")


def dice(a, b, label):
    a, b = a == label, b == label
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_atlas_segmentation_returns_warped_atlas_probabilities():
    label = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    label[:, 4:8], label[:, 10:12] = 1, 2
    module = AtlasSegmentation(multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4)),
                               torch.rand(1, 16, 16, 8), label)
    out = module(torch.rand(2, 1, 16, 16, 8))
    assert out.shape == (2, 3, 16, 16, 8)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 16, 16, 8))
    assert torch.equal(out.argmax(1)[0], label[0])  # an untrained network is the identity map
    assert all(k.startswith("network.") for k in module.state_dict())  # the atlas is not part of the weights
    with pytest.raises(ValueError, match="network grid"):
        module(torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="same 2D/3D shape"):
        AtlasSegmentation(module.network, torch.rand(1, 16, 16, 8), label[:, :8])


def test_atlas_segmentation_instance_optimisation_restores_the_weights():
    label = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    label[:, 4:8] = 1
    network = multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    module = AtlasSegmentation(network, torch.rand(1, 16, 16, 8), label)  # io_steps = 0: no loss needed
    assert module.loss is None
    default = module._io_loss()  # the published recipe, also when io_steps is raised after construction
    assert default.lmbda == 1.5 and type(default.regularizer).__name__ == "GradientInverseConsistencyLoss"
    assert default.spatial_dims == 3
    before = {k: v.clone() for k, v in module.state_dict().items()}
    image = torch.rand(1, 1, 16, 16, 8)
    identity = module(image)  # untrained: the atlas labels themselves
    module.io_steps, module.io_lr = 2, 1e-2
    out = module(image)
    assert out.shape == (1, 2, 16, 16, 8) and torch.isfinite(out).all()
    assert (out - identity).abs().max() > 1e-3  # the fine-tuned network moved the labels
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # fine-tuned on the pair, then restored
    given = ICONLoss("mse", 10.0, spatial_dims=3)
    assert AtlasSegmentation(network, torch.rand(1, 16, 16, 8), label, io_steps=1, loss=given)._io_loss() is given


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory):
    """The knee atlas bundle with a tiny untrained network (the identity map) and a user image on another grid."""
    root = tmp_path_factory.mktemp("atlas") / "knee_atlas_segmentation"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("models", "eval"))
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["architecture"] = TINY
    config["io_steps"] = 0  # the network alone: the identity map
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_knee_atlas_bundle.py"), "--bundle", str(root), "--identity"],
        check=True,
        capture_output=True,
    )
    image, label = render_knee(replace(KneeAnatomy(side="LEFT"), noise=0.0), USER_SHAPE, USER_AFFINE)
    user = root.parent / "user"
    user.mkdir()
    nib.save(nib.Nifti1Image(image, USER_AFFINE), str(user / "knee_image.nii.gz"))
    return root, user, label


def test_bundle_returns_labels_on_the_users_grid(bundle_copy):
    root, user, truth = bundle_copy
    run_bundle(
        "run",
        "--config_file",
        str(root / "configs" / "inference.json"),
        "--bundle_root",
        str(root),
        "--input_dir",
        str(user),
        "--output_dir",
        str(root / "eval"),
    )
    out = nib.load(root / "eval" / "knee_image_seg.nii.gz")
    np.testing.assert_allclose(out.affine, USER_AFFINE, atol=1e-4)  # back on the user's grid, in its orientation
    seg = np.asarray(out.dataobj).squeeze()
    assert seg.shape == USER_SHAPE
    assert dice(seg, truth, 1) > 0.7 and dice(seg, truth, 2) > 0.6


SHIPPED = BUNDLE / "models" / "model.pt"


def shipped_bundle(**overrides):
    """The shipped bundle's ``inference.json`` parsed on the CPU (``overrides``: e.g. ``output_dir``)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')", **overrides})
    return parser


def test_shipped_weights_are_float16_under_10_mb_and_load_strictly_into_the_network():
    assert SHIPPED.stat().st_size < 10e6
    state = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in floats)
    network = shipped_bundle().get_parsed_content("network_def")
    network.load_state_dict(state, strict=True)  # float16 data copied into the float32 network
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in network.parameters())


def test_shipped_bundle_segments_its_own_atlas_image(tmp_path):
    """The bundle as MONAI runs it (CheckpointLoader, the atlas folder as its default input), with 5 instance
    optimisation steps instead of 30 for speed: the atlas registered to its own image gives back the atlas labels
    (about 0.96 / 0.97; the network alone gives 0.89 / 0.98)."""
    shipped_bundle(output_dir=str(tmp_path), io_steps=5).get_parsed_content("evaluator").run()
    seg = np.asarray(nib.load(tmp_path / "atlas_image_seg.nii.gz").dataobj).squeeze()
    truth = np.asarray(nib.load(BUNDLE / "atlas" / "atlas_label.nii.gz").dataobj)
    assert seg.shape == truth.shape
    assert dice(seg, truth, 1) > 0.9 and dice(seg, truth, 2) > 0.9


MONAILABEL_PYTHON = os.environ.get("MONAILABEL_PYTHON") or next(
    (str(p) for p in [ROOT / ".venv-monailabel" / "bin" / "python"] if p.is_file()), None
)


@pytest.mark.monailabel
@pytest.mark.skipif(
    not MONAILABEL_PYTHON,
    reason="MONAI Label is not installed: bash scripts/monailabel_env.sh creates .venv-monailabel (or set "
    "MONAILABEL_PYTHON to a Python with MONAI Label)",
)
@pytest.mark.timeout(1200)  # minutes on 2 busy CPU cores (30 instance-optimisation steps of about 1 s when idle)
@pytest.mark.parametrize("image", ["sample", "user grid"])
def test_monailabel_server_segments_with_the_atlas_bundle(image, tmp_path):
    """scripts/monailabel_segment_sample.sh end to end with the shipped weights: a MONAI Label server started, an
    image segmented over HTTP, the labels checked on the image's own grid, the server stopped. The sample (a knee no
    training used) with the bundle as shipped; the atlas anatomy stored on another grid in another orientation with
    5 instance-optimisation steps instead of 30 (it is the atlas' own anatomy), for time."""
    env = dict(os.environ, PYTHON=MONAILABEL_PYTHON, OUT=str(tmp_path / "out"))
    if image == "user grid":
        picture, truth = render_knee(replace(KneeAnatomy(side="LEFT"), noise=0.0), USER_SHAPE, USER_AFFINE)
        nib.save(nib.Nifti1Image(picture, USER_AFFINE), str(tmp_path / "knee_image.nii.gz"))
        nib.save(nib.Nifti1Image(truth, USER_AFFINE), str(tmp_path / "knee_label.nii.gz"))
        bundle = tmp_path / "knee_atlas_segmentation"
        shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval"))
        config = json.loads((bundle / "configs" / "inference.json").read_text())
        config["io_steps"] = 5
        (bundle / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
        env.update(IMAGE=str(tmp_path / "knee_image.nii.gz"), LABEL=str(tmp_path / "knee_label.nii.gz"),
                   BUNDLE=str(bundle))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "monailabel_segment_sample.sh")], env=env,
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model knee_atlas_segmentation with labels {'femoral_cartilage': 1, 'tibial_cartilage': 2}" in proc.stdout
    assert "labels [0, 1, 2]" in proc.stdout
    dices = {line.split()[1].rstrip(":"): float(line.split()[2]) for line in proc.stdout.splitlines()
             if line.startswith("Dice ")}
    assert set(dices) == {"femoral_cartilage", "tibial_cartilage"}
    assert dices["femoral_cartilage"] > 0.7 and dices["tibial_cartilage"] > 0.6
    if image == "user grid":
        seg = np.asarray(nib.load(tmp_path / "out" / "seg.nii.gz").dataobj).squeeze()
        assert seg.shape == USER_SHAPE
        assert dice(seg, truth, 1) > 0.7 and dice(seg, truth, 2) > 0.6
    # the server is gone: its port answers no more
    port = int(proc.stdout.split("127.0.0.1:")[1].split()[0])
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5)
