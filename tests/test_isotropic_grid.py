"""A network grid shaped like each fixed image (``isotropic``, ``--isotropic-grid``)."""

import json

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from monai_icon.apps import load_registration_model
from monai_icon.apps.cli import main
from monai_icon.apps.register import register_images
from monai_icon.transforms.network_grid import NetworkGrid
from test_register_files import _shifted_balls_and_identity_model


def test_size_for_keeps_the_model_grid_unless_isotropic():
    image = MetaTensor(torch.zeros(1, 98, 116, 94), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    assert NetworkGrid((128, 64, 128)).size_for(image) == (128, 64, 128)
    size = NetworkGrid((128, 64, 128), isotropic=True).size_for(image)
    assert size == (96, 112, 96)  # 196 x 232 x 188 mm with about 128 * 64 * 128 voxels, multiples of 16
    assert all(s % 16 == 0 for s in size) and abs(np.prod(size) / (128 * 64 * 128) - 1) < 0.1
    small = NetworkGrid((8, 8, 4), isotropic=True, size_multiple=4).size_for(image)
    assert all(s % 4 == 0 and s >= 8 for s in small)


def test_register_images_on_a_grid_shaped_like_the_fixed_image(tmp_path):
    """The pair is brought onto the isotropic grid (the map's grid says so), the world transform stays right: the
    identity network maps each fixed voxel centre to the same world point, as on the model's grid."""
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    image = nib.load(fixed)
    fixed_image = MetaTensor(torch.as_tensor(np.asarray(image.dataobj), dtype=torch.float32)[None],
                             affine=torch.as_tensor(image.affine))
    points = {}
    for isotropic in (False, True):
        model = load_registration_model(model_file, isotropic=isotropic)
        result = register_images(model, fixed_image, fixed_image)
        points[isotropic] = result.fixed_to_moving(image.affine, image.shape)
        expected = (24, 24, 12) if not isotropic else model.grid.size_for(fixed_image)
        assert result.grid_size == tuple(expected)
    assert model.grid.size_for(fixed_image) != (24, 24, 12)
    torch.testing.assert_close(points[True], points[False], atol=1e-3, rtol=0)


def test_isotropic_grid_from_the_command_line(tmp_path, capsys):
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    out = tmp_path / "w.nii.gz"
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model_file),
                 "--warped", str(out), "--isotropic-grid", "--ensemble"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert out.is_file() and 0.0 <= summary["folds_percent"] <= 100.0


def test_isotropic_grid_runs_the_u_nets_without_padding(tmp_path):
    """On the isotropic grid (sizes multiples of 16) the U-Nets see the images unpadded; on the model's grid they
    pad to multiples of ``2 ** depth`` as in training; their setting is the same after each registration."""
    from monai_icon.apps import save_registration_model
    from monai_icon.networks import multistep_registration
    from monai_icon.networks.nets import UNet

    fixed, _, _ = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    spec = {"_target_": "monai_icon.networks.multistep_registration", "coarse_steps": 1,
            "encoder_channels": [4, 4, 4, 4, 4], "decoder_channels": [4, 4, 4, 4, 4]}
    network = multistep_registration(coarse_steps=1, encoder_channels=(4,) * 5, decoder_channels=(4,) * 5)
    model_file = save_registration_model(tmp_path / "deep.pt", network, spec, spatial_size=(40, 40, 20),
                                         percentiles=None)
    image = nib.load(fixed)
    fixed_image = MetaTensor(torch.as_tensor(np.asarray(image.dataobj), dtype=torch.float32)[None],
                             affine=torch.as_tensor(image.affine))
    for isotropic in (False, True):
        model = load_registration_model(model_file, isotropic=isotropic)
        unets = [m for m in model.network.modules() if isinstance(m, UNet)]
        seen = []
        unets[0].down[0].register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[2:])))
        register_images(model, fixed_image, fixed_image)
        size = model.grid.size_for(fixed_image)
        # the coarse step's U-Net registers the images at half the grid's size
        expected = tuple(s // 2 for s in size) if isotropic else (32, 32, 32)
        assert seen[0] == expected, (isotropic, size, seen)
        assert {u.pad_multiple for u in unets} == {32}
