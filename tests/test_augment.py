import math

import pytest
import torch
from torch.utils.data import DataLoader

from monai_icon.data import RandomPairDataset, TrianglesCirclesDataset
from monai_icon.engines import ICONTrainer
from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField, RegistrationNet
from monai_icon.networks.nets import UNet
from monai_icon.transforms import RandBatchAugmentd, affine_warp, random_affine_theta, random_smooth_displacement


def _blob(shape, centre, width=1.5):
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return torch.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / (2 * width**2))


def _centroid(image):
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in image.shape], indexing="ij")
    return torch.stack([(a * image).sum() / image.sum() for a in axes])


@pytest.mark.parametrize("shape", [(28, 40), (12, 16, 20)])
def test_zero_ranges_and_prob_zero_are_the_identity(shape):
    images = torch.rand(3, 2, *shape)
    for kwargs in ({}, {"rotate_degrees": 30, "scale": 0.2, "translate": 3, "prob": 0.0}):
        theta = random_affine_theta(3, shape, **kwargs)
        assert theta.shape == (3, len(shape), len(shape) + 1)
        assert torch.allclose(affine_warp(images, theta), images, atol=1e-5)


@pytest.mark.parametrize("shape", [(30, 44), (20, 24, 28)])
def test_translation_moves_content_by_the_drawn_voxels(shape):
    generator = torch.Generator().manual_seed(3)
    theta = random_affine_theta(4, shape, translate=3.0, generator=generator, dtype=torch.float64)
    half = torch.tensor([(n - 1) / 2 for n in reversed(shape)], dtype=torch.float64)
    shift_xyz = theta[..., -1] * half  # voxels, x (last axis) first
    assert shift_xyz.abs().max() <= 3.0 and shift_xyz.abs().max() > 0.5
    centre = [n / 2 for n in shape]
    image = _blob(shape, centre)[None, None].expand(4, 1, *shape)
    warped = affine_warp(image, theta)
    for b in range(4):
        expected = torch.tensor(centre, dtype=torch.float64) - shift_xyz[b].flip(0)  # content moves by -t
        assert torch.allclose(_centroid(warped[b, 0]), expected, atol=0.02)


@pytest.mark.parametrize("shape", [(30, 50), (16, 20, 30)])
def test_rotation_without_scaling_is_a_rotation_in_voxel_units(shape):
    theta = random_affine_theta(5, shape, rotate_degrees=40, generator=torch.Generator().manual_seed(1),
                                dtype=torch.float64)
    half = torch.tensor([(n - 1) / 2 for n in reversed(shape)], dtype=torch.float64)
    voxel = half[None, :, None] * theta[..., :-1] / half[None, None, :]
    eye = torch.eye(len(shape), dtype=torch.float64).expand_as(voxel)
    assert torch.allclose(voxel @ voxel.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(voxel), torch.ones(5, dtype=torch.float64))
    angles = torch.rad2deg(torch.acos(((voxel.diagonal(dim1=1, dim2=2).sum(-1) - (len(shape) - 2)) / 2).clamp(-1, 1)))
    assert angles.max() > 5 and (len(shape) == 3 or angles.max() <= 40 + 1e-9)
    scaled = random_affine_theta(200, shape, scale=0.1, generator=torch.Generator().manual_seed(1))
    factors = scaled[..., :-1].diagonal(dim1=1, dim2=2)
    assert factors.min() >= 0.9 - 1e-6 and factors.max() <= 1.1 + 1e-6 and factors.std() > 0.03


def test_batch_transform_draws_per_image_is_seeded_and_moves_followers():
    torch.manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    labels = ((rows > 8).float() + (cols > 14).float())[None, None].repeat(4, 1, 1, 1)  # three smooth regions
    batch = {"moving_image": labels.clone(), "fixed_image": labels.clone(), "moving_label": labels.clone(), "x": 1}
    follow = {"moving_label": "moving_image"}
    augment = RandBatchAugmentd(["moving_image", "fixed_image"], 15, 0.1, 2, follow=follow, seed=5)
    out = augment(batch)
    assert out["x"] == 1 and not torch.equal(out["moving_image"], batch["moving_image"])
    assert not torch.allclose(out["moving_image"], out["fixed_image"])  # independent draws per key
    assert not torch.allclose(out["moving_image"][0], out["moving_image"][1])  # and per sample
    assert set(out["moving_label"].unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest neighbour keeps label values
    # the follower got the moving image's matrices: where the bilinear image equals an integer, the labels agree
    agree = ((out["moving_image"] - out["moving_label"]).abs() < 0.5).float().mean()
    assert agree > 0.9 and agree > ((out["fixed_image"] - out["moving_label"]).abs() < 0.5).float().mean()
    again = RandBatchAugmentd(["moving_image", "fixed_image"], 15, 0.1, 2, follow=follow, seed=5)(batch)
    assert all(torch.equal(out[k], again[k]) for k in ("moving_image", "fixed_image", "moving_label"))


@pytest.mark.parametrize("shape", [(21, 33), (9, 13, 17)])
def test_smooth_displacement_has_the_asked_size_in_voxels(shape):
    generator = torch.Generator().manual_seed(0)
    disp = random_smooth_displacement(400, shape, 2.5, control_points=4, generator=generator, dtype=torch.float64)
    assert disp.shape == (400, *shape, len(shape))
    half = torch.tensor([(n - 1) / 2 for n in reversed(shape)], dtype=torch.float64)
    corner = disp[(slice(None), *([0] * len(shape)))] * half  # a control point: voxels, x first
    assert abs(float(corner.std()) - 2.5) < 0.2
    centre = disp[(slice(None), *[n // 2 for n in shape])] * half
    assert float(centre.std()) < 2.5  # between control points: interpolated, smoother
    assert torch.equal(random_smooth_displacement(3, shape, 0.0), torch.zeros(3, *shape, len(shape)))


def test_deformation_moves_labels_with_their_image_and_gamma_is_one_power_per_image():
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    labels = ((rows > 12).float() + (cols > 18).float())[None, None].repeat(6, 1, 1, 1)
    out = RandBatchAugmentd("image", 0, 0, 0, deform=2.0, follow={"label": "image"}, seed=2)(
        {"image": labels.clone(), "label": labels.clone()})
    assert not torch.equal(out["label"], labels)
    assert ((out["image"] - out["label"]).abs() < 0.5).float().mean() > 0.9
    images = torch.rand(6, 1, 8, 8) * 0.9 + 0.05
    out = RandBatchAugmentd("image", 0, 0, 0, gamma=2.0, seed=1)({"image": images})["image"]
    powers = (out.log() / images.log()).flatten(1)
    assert torch.allclose(powers, powers[:, :1].expand_as(powers), atol=1e-4)  # one power per image
    assert powers.min() >= 0.5 - 1e-5 and powers.max() <= 2 + 1e-5 and powers[:, 0].std() > 0.05


def test_bad_settings_and_inputs_are_named():
    with pytest.raises(ValueError, match="scale"):
        RandBatchAugmentd("image", scale=1.5)
    with pytest.raises(ValueError, match="rotate_degrees"):
        RandBatchAugmentd("image", rotate_degrees=-1)
    with pytest.raises(ValueError, match="translate"):
        RandBatchAugmentd("image", translate=math.nan)
    with pytest.raises(ValueError, match="prob"):
        RandBatchAugmentd("image", prob=2)
    with pytest.raises(ValueError, match="magnitude"):
        RandBatchAugmentd("image", deform=-2)
    with pytest.raises(ValueError, match="control_points"):
        RandBatchAugmentd("image", deform=2, deform_points=1)
    with pytest.raises(ValueError, match="gamma"):
        RandBatchAugmentd("image", gamma=0.5)
    with pytest.raises(ValueError, match="not one of keys"):
        RandBatchAugmentd("image", follow={"label": "other"})
    with pytest.raises(ValueError, match="2D or 3D"):
        RandBatchAugmentd("image")({"image": torch.rand(1, 28, 28)})
    with pytest.raises(KeyError):
        RandBatchAugmentd("image")({"other": torch.rand(1, 1, 8, 8)})
    with pytest.raises(ValueError, match="does not match"):
        RandBatchAugmentd("image", follow={"label": "image"})({"image": torch.rand(2, 1, 8, 8),
                                                               "label": torch.rand(2, 1, 8, 9)})


def test_trainer_augments_every_batch_and_refuses_unmoved_masks():
    torch.manual_seed(0)
    data = TrianglesCirclesDataset(12, (16, 16), seed=0)
    loader = DataLoader(RandomPairDataset(data, 8, seed=0), batch_size=4)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    seen = []

    def augment(batch):
        seen.append(batch["moving_image"].clone())
        return RandBatchAugmentd(["moving_image", "fixed_image"], 20, 0.1, 2, seed=len(seen))(batch)

    trainer = ICONTrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters(), 1e-3), ICONLoss("mse", 16),
                          augment=augment, decollate=False)
    trainer.run()
    assert len(seen) == 2
    assert not torch.allclose(trainer.state.output["moving_image"], seen[-1])  # the network saw augmented images
    with pytest.raises(TypeError, match="augment"):
        ICONTrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), ICONLoss("mse", 16), augment=3)
    masked = DataLoader(RandomPairDataset([{"image": d["image"], "mask": torch.ones_like(d["image"])} for d in data],
                                          4, keys=("image", "mask"), seed=0), batch_size=4)
    trainer = ICONTrainer("cpu", 1, masked, net, torch.optim.Adam(net.parameters()), ICONLoss("mse", 16),
                          augment=RandBatchAugmentd(["moving_image", "fixed_image"]))
    with pytest.raises(ValueError, match="follow"):
        trainer.run()


def test_2d_bundle_builds_the_augmentation_only_when_asked():
    from pathlib import Path

    from monai.bundle import ConfigParser

    train = Path(__file__).resolve().parents[1] / "bundle" / "mnist_icon" / "configs" / "train.yaml"
    parser = ConfigParser()
    parser.read_config(str(train))
    assert parser.get_parsed_content("augment") is None
    parser = ConfigParser()
    parser.read_config(str(train))
    parser.update({"augment_rotate": 10, "augment_translate": 2})
    augment = parser.get_parsed_content("augment")
    assert isinstance(augment, RandBatchAugmentd) and augment.keys == ("moving_image", "fixed_image")
    assert (augment.rotate_degrees, augment.scale, augment.translate) == (10.0, 0.0, 2.0)


@pytest.mark.parametrize("label_weight", [0.0, 1.0])
def test_trainer_augments_labels_only_when_the_loss_reads_them(label_weight):
    torch.manual_seed(0)
    items = [{"image": torch.rand(1, 16, 16), "label": (torch.rand(1, 16, 16) > 0.5).float()} for _ in range(4)]
    loader = DataLoader(RandomPairDataset(items, 4, seed=0), batch_size=2)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    keys = []
    augment_spatial = RandBatchAugmentd(["moving_image", "fixed_image"], 10, follow={
        "moving_label": "moving_image", "fixed_label": "fixed_image"}, seed=0)

    def augment(batch):
        keys.append(set(batch))
        return augment_spatial(batch)

    loss = ICONLoss("mse", 16, spatial_dims=2, label_weight=label_weight, num_classes=2)
    trainer = ICONTrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters(), 1e-3), loss, augment=augment,
                          decollate=False)
    trainer.run()
    assert len(keys) == 2
    has_labels = {"moving_label", "fixed_label"} <= keys[0]
    assert has_labels == (label_weight > 0) and {"moving_image", "fixed_image"} <= keys[0]
    assert {"moving_label", "fixed_label"} <= set(trainer.state.batch)  # the engine's batch keeps them
