"""The one-way refinement (``io_mode="one-way"``, the ``--refine`` preset) and the grid it compares images on."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_icon.apps import register_files
from monai_icon.apps.cli import main
from monai_icon.engines.instance_optimisation import Refinement, refine_one_way
from monai_icon.losses import get_similarity
from monai_icon.networks.maps import DisplacementMap, identity_grid
from monai_icon.transforms.network_grid import NetworkGrid, isotropic_grid
from test_register_files import _shifted_balls_and_identity_model


class _IdentityNet(torch.nn.Module):
    """A registration network whose maps are the identity (zero displacement)."""

    def forward(self, moving, fixed):
        return DisplacementMap(torch.zeros(moving.shape[0], moving.ndim - 2, *moving.shape[2:]))


def _balls(shape=(16, 16, 8), shift=(2.0, 0.0, 0.0)):
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    centre = torch.tensor([n / 2 for n in shape]).reshape(3, 1, 1, 1)

    def ball(offset):
        r = ((grid - centre - torch.tensor(offset).reshape(3, 1, 1, 1)) ** 2).sum(0).sqrt()
        return torch.sigmoid(4.0 - r)[None, None]

    return ball(shift), ball((0.0, 0.0, 0.0))


def test_the_refinement_moves_the_moving_image_onto_the_fixed_one():
    """A two-voxel shift that the (identity) network misses: the refined map's warped image is much closer to the
    fixed one, the loss goes down, and the map stays a displacement on the field grid."""
    moving, fixed = _balls()
    network = _IdentityNet()
    similarity = get_similarity("mse", 3)
    torch.manual_seed(0)
    phi, losses = refine_one_way(network, moving, fixed, similarity, steps=60, lr=2e-2, levels=2, smoothness=0.1)
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0]
    before = float(((moving - fixed) ** 2).mean())
    after = float(((phi.warp(moving) - fixed) ** 2).mean())
    assert after < 0.3 * before, (before, after)
    assert tuple(phi.displacement.shape) == (1, 3, 16, 16, 8)


class _FixedDisplacementNet(torch.nn.Module):
    """A registration network whose moving-to-fixed map is one given displacement field (``[0, 1]`` units)."""

    def __init__(self, displacement):
        super().__init__()
        self.displacement = displacement

    def forward(self, moving, fixed):
        return DisplacementMap(self.displacement.expand(moving.shape[0], -1, -1, -1, -1))


def test_the_residual_is_added_to_the_networks_displacement_or_composed_with_its_map():
    """``phi + u`` by default, ``phi o (id + u)`` with ``compose``: the same for a network map that is a pure shift
    (a constant displacement resampled anywhere is itself), different for one that varies in space; both register
    the pair better than the network's map."""
    moving, fixed = _balls()
    shape = tuple(moving.shape[2:])
    shift = torch.zeros(1, 3, *shape)
    shift[:, 1] = 0.05
    ramp = torch.zeros(1, 3, *shape)
    ramp[:, 1] = 0.1 * identity_grid(shape, "cpu")[:, 0]
    error = {}
    for name, start in (("shift", shift), ("ramp", ramp)):
        network = _FixedDisplacementNet(start)
        before = float(((DisplacementMap(start).warp(moving) - fixed) ** 2).mean())
        maps = {}
        for compose in (False, True):
            phi, _ = refine_one_way(network, moving, fixed, get_similarity("mse", 3), steps=30, lr=2e-2, levels=2,
                                    smoothness=0.1, compose=compose)
            assert float(((phi.warp(moving) - fixed) ** 2).mean()) < 0.5 * before
            maps[compose] = phi.displacement
        error[name] = float((maps[False] - maps[True]).abs().max())
    assert error["shift"] < 1e-5 and error["ramp"] > 1e-3, error


def test_smoothness_keeps_the_residual_small():
    moving, fixed = _balls()
    network = _IdentityNet()
    sizes = {}
    for weight in (0.0, 100.0):
        phi, _ = refine_one_way(network, moving, fixed, get_similarity("mse", 3), steps=20, lr=2e-2, levels=2,
                                smoothness=weight)
        residual = phi.grid((16, 16, 8)) - identity_grid((16, 16, 8), "cpu")
        sizes[weight] = float(residual.abs().mean())
    assert sizes[100.0] < 0.5 * sizes[0.0], sizes


def test_fine_steps_compare_the_finer_images_last():
    """With finer loss images and ``fine_steps``, the early steps compare them pooled onto the field grid: the loss
    values of the two stages differ in kind (different grids), and a bad setting is refused."""
    moving, fixed = _balls((16, 16, 8))
    fine = _balls((32, 32, 16), (4.0, 0.0, 0.0))
    network = _IdentityNet()
    phi, losses = refine_one_way(network, moving, fixed, get_similarity("mse", 3), steps=6, lr=1e-2,
                                 loss_images=fine, shape=(16, 16, 8), levels=2, fine_steps=2)
    assert len(losses) == 6 and tuple(phi.displacement.shape[2:]) == (16, 16, 8)
    for bad, match in (({"fine_steps": 7}, "fine_steps"), ({"smoothness": -1.0}, "smoothness"),
                       ({"steps": -1}, "steps"), ({"levels": 0}, "levels"), ({"lr": 0.0}, "learning rate")):
        with pytest.raises(ValueError, match=match):
            refine_one_way(network, moving, fixed, get_similarity("mse", 3), **{"steps": 6, **bad})
    with pytest.raises(ValueError, match="one pair at a time"):
        refine_one_way(network, moving.expand(2, -1, -1, -1, -1), fixed.expand(2, -1, -1, -1, -1),
                       get_similarity("mse", 3))


def test_isotropic_grid_follows_the_field_of_view():
    assert isotropic_grid((200.0, 240.0, 200.0), 80 * 96 * 80) == (80, 96, 80)
    assert isotropic_grid((10.0, 10.0), 36) == (6, 6)
    assert all(s % 2 == 0 for s in isotropic_grid((196.0, 232.0, 188.0), 614_400))
    for extent, voxels in (((0.0, 1.0), 100), ((1.0, float("nan")), 100), ((1.0, 1.0), 10), ((1.0, 1.0), 2.5)):
        with pytest.raises(ValueError):
            isotropic_grid(extent, voxels)


def test_field_of_view_in_the_grids_axis_order():
    """Voxels times spacing, permuted as the grid reorients and reverses the axes."""
    affine = torch.tensor([[0.0, 0.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    image = MetaTensor(torch.zeros(1, 10, 20, 30), affine=affine)  # array axes: A (2 mm), S (1 mm), R (3 mm)
    assert NetworkGrid((8, 8, 8)).field_of_view(image) == (20.0, 20.0, 90.0)
    assert NetworkGrid((8, 8, 8), axcodes="RAS").field_of_view(image) == (90.0, 20.0, 20.0)
    assert NetworkGrid((8, 8, 8), axcodes="RAS", reverse_axes=True).field_of_view(image) == (20.0, 20.0, 90.0)


def test_one_way_refinement_of_files_with_a_grid_from_the_fixed_image(tmp_path):
    """``register_files`` with ``io_mode="one-way"`` and ``voxels``: a two-voxel shift of a ball is recovered better
    than by the network alone; its keywords and its value give the same files."""
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    refinement = Refinement(steps=40, lr=1e-2, mode="one-way", levels=2, fine_steps=5, voxels=24 * 24 * 16,
                            smoothness=0.5)
    errors, values = {}, {}
    for name, kwargs in (("none", {}), ("value", {"refinement": refinement}), ("keywords", refinement.arguments())):
        out = tmp_path / f"{name}.nii.gz"
        torch.manual_seed(0)
        summary = register_files(fixed, moving, model_file, warped=out, **kwargs)
        values[name] = nib.load(out).get_fdata()
        errors[name] = float(((values[name] - nib.load(fixed).get_fdata()) ** 2).mean())
        assert len(summary["io_losses"]) == (0 if name == "none" else 40)
    assert errors["value"] < 0.5 * errors["none"], errors
    np.testing.assert_array_equal(values["value"], values["keywords"])


@pytest.mark.parametrize("extra,message", [
    (["--io-mode", "one-way", "--io-steps", "3", "--io-smoothness", "-1"], "--io-smoothness must be a finite number"),
    (["--io-steps", "3", "--io-voxels", "1000"], "--io-voxels needs io_mode"),
    (["--io-mode", "one-way", "--io-steps", "3", "--io-voxels", "10"], "--io-voxels must be an integer >= 64"),
])
def test_one_way_flags_are_checked(tmp_path, capsys, extra, message):
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    out = tmp_path / "w.nii.gz"
    status = main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model_file),
                   "--warped", str(out), *extra])
    assert status == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_one_way_takes_no_masks(tmp_path):
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    with pytest.raises(ValueError, match="one-way' compares the images alone"):
        register_files(fixed, moving, model_file, warped=tmp_path / "w.nii.gz", fixed_mask=fixed, moving_mask=moving,
                       io_mode="one-way", io_steps=3)


def test_refine_from_the_command_line(tmp_path, capsys):
    """``--refine`` is the one-way preset: it runs on the shifted balls and writes the summary of its steps."""
    from monai_icon.apps.presets import RECOMMENDED_REFINEMENT

    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    out = tmp_path / "w.nii.gz"
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model_file),
                 "--warped", str(out), "--refine", "--io-voxels", str(24 * 24 * 16), "--lncc-kernel", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["io_losses"]) == RECOMMENDED_REFINEMENT["io_steps"]
    assert 0.0 <= summary["folds_percent"] < 1.0
