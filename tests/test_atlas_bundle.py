"""Atlas-based segmentation: the module, the knee atlas bundle run by MONAI, and MONAI Label serving it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MONAILABEL_PYTHON = os.environ.get("MONAILABEL_PYTHON")


@pytest.mark.monailabel
@pytest.mark.skipif(
    not MONAILABEL_PYTHON, reason="set MONAILABEL_PYTHON to a Python with MONAI Label (scripts/monailabel_env.sh)"
)
def test_monailabel_server_segments_with_the_atlas_bundle(bundle_copy, tmp_path):
    root, user, truth = bundle_copy
    port = _free_port()
    env = dict(os.environ, PYTHON=MONAILABEL_PYTHON, PORT=str(port), BUNDLE=str(root), WORK=str(tmp_path / "ml"))
    server = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "monailabel_server.sh")],
        env=env,
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            try:
                info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=5).read())
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError("MONAI Label did not start:\n" + (tmp_path / "server.log").read_text()[-4000:])
                time.sleep(3)
        assert "knee_atlas_segmentation" in info["models"]
        assert info["models"]["knee_atlas_segmentation"]["labels"] == {"femoral_cartilage": 1, "tibial_cartilage": 2}
        result = subprocess.run(
            [
                "curl",
                "-s",
                "-f",
                "-X",
                "POST",
                f"http://127.0.0.1:{port}/infer/knee_atlas_segmentation?output=image",
                "-F",
                f"file=@{user / 'knee_image.nii.gz'}",
                "-o",
                str(tmp_path / "seg.nii.gz"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr + (tmp_path / "server.log").read_text()[-4000:]
        seg = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj).squeeze()
        assert seg.shape == USER_SHAPE
        assert dice(seg, truth, 1) > 0.7 and dice(seg, truth, 2) > 0.6
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
