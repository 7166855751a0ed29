"""Known-map pairs (``RandSelfPaird``), their loss (``MapSupervisionLoss``) and the trainer's map supervision."""

import pytest
import torch
from torch.utils.data import DataLoader

from monai_icon.data import RandomPairDataset, TrianglesCirclesDataset
from monai_icon.engines import ICONTrainer
from monai_icon.losses import ICONLoss, MapSupervisionLoss
from monai_icon.networks import DisplacementField, RegistrationNet
from monai_icon.networks.maps import identity_grid, interpolate
from monai_icon.networks.nets import UNet
from monai_icon.transforms import RandBatchAugmentd, RandSelfPaird, chain_batch_transforms


def _batch(shape, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    moving = torch.rand(batch, 1, *shape, generator=g)
    return {"moving_image": moving, "fixed_image": torch.rand(batch, 1, *shape, generator=g),
            "moving_label": (moving > 0.5).long(), "fixed_label": torch.zeros(batch, 1, *shape, dtype=torch.long)}


@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 10)])
def test_known_pairs_are_the_moving_image_under_the_recorded_map(shape):
    data = _batch(shape)
    out = RandSelfPaird(prob=0.5, deform=2.0, seed=1)(data)
    weight, target = out["target_weight"], out["target_map"]
    assert weight.shape == (4,) and set(weight.tolist()) == {0.0, 1.0}  # this seed selects some, not all
    assert target.shape == (4, len(shape), *shape)
    selected = weight.bool()
    # A o phi_AB = B with the package's own interpolation (pull-back convention, [0, 1] units)
    warped = interpolate(data["moving_image"], target, padding_mode="zeros")
    assert torch.allclose(warped[selected], out["fixed_image"][selected], atol=1e-5)
    nearest = interpolate(data["moving_label"].float(), target, mode="nearest", padding_mode="zeros")
    assert torch.equal(nearest[selected].long(), out["fixed_label"][selected])
    # samples not selected keep their fixed image and labels, and their known map is the identity
    assert torch.equal(out["fixed_image"][~selected], data["fixed_image"][~selected])
    assert torch.equal(out["fixed_label"][~selected], data["fixed_label"][~selected])
    assert torch.allclose(target[~selected], identity_grid(shape).expand(int((~selected).sum()), *target.shape[1:]))
    # the displacement has about the asked size in voxels (5 control points, standard deviation 2)
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).reshape(1, -1, *([1] * len(shape)))
    voxels = ((target - identity_grid(shape)) * scale)[selected]
    assert 0.5 < float(voxels.pow(2).mean().sqrt()) < 4.0
    # the input dictionary is not modified, and the same seed gives the same pairs
    assert not torch.equal(data["fixed_image"], out["fixed_image"])
    again = RandSelfPaird(prob=0.5, deform=2.0, seed=1)(_batch(shape))
    assert torch.equal(again["target_map"], target)


def test_prob_zero_and_one_and_bad_settings():
    data = _batch((16, 16))
    none = RandSelfPaird(prob=0.0)(data)
    assert torch.equal(none["fixed_image"], data["fixed_image"]) and not none["target_weight"].any()
    every = RandSelfPaird(prob=1.0, gamma=1.5)(data)
    assert every["target_weight"].all()
    warped = interpolate(data["moving_image"], every["target_map"], padding_mode="zeros")
    assert not torch.allclose(warped, every["fixed_image"], atol=1e-3)  # the gamma changes intensities...
    assert torch.equal(warped > 0, every["fixed_image"] > 0)  # ...but not where the content is
    for kwargs, match in (({"prob": 1.5}, "prob"), ({"deform": -1.0}, "magnitude"), ({"gamma": 0.5}, "gamma"),
                          ({"keys": ["moving_image"]}, "keys")):
        with pytest.raises(ValueError, match=match):
            RandSelfPaird(**kwargs)
    with pytest.raises(ValueError, match="shape"):
        RandSelfPaird()({"moving_image": torch.rand(2, 1, 8, 8), "fixed_image": torch.rand(2, 1, 8, 9)})


def test_map_supervision_loss_is_relative_in_voxels():
    shape = (9, 17, 5)
    identity = identity_grid(shape).expand(2, -1, -1, -1, -1)
    shift = torch.zeros(2, 3, 1, 1, 1)
    shift[0, 0], shift[1, 1] = 2 / 8, 2 / 16  # two voxels along axis 0, two along axis 1
    target = identity + shift
    loss = MapSupervisionLoss(reduction="none")
    assert torch.allclose(loss(identity, target), torch.ones(2))  # the identity: 1 whatever the size or axis
    assert torch.allclose(loss(target, target), torch.zeros(2))
    half = identity + shift / 2
    assert torch.allclose(loss(half, target), torch.full((2,), 0.25))  # half the way: a quarter of the error
    assert torch.allclose(loss(identity, target, torch.tensor([1.0, 0.0])), torch.tensor([1.0, 0.0]))
    assert torch.allclose(loss(identity, identity), torch.zeros(2))  # nothing to learn: 0, not 0 / 0
    assert torch.isclose(MapSupervisionLoss()(identity, target, torch.tensor([1.0, 0.0])), torch.tensor(0.5))
    phi = half.clone().requires_grad_(True)
    MapSupervisionLoss()(phi, target).backward()
    assert phi.grad is not None and float(phi.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="shape"):
        loss(identity, identity[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        loss(identity, identity.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="weight"):
        loss(identity, target, torch.ones(3))
    with pytest.raises(ValueError, match="reduction"):
        MapSupervisionLoss(reduction="max")


def test_chain_of_batch_transforms():
    spatial = RandBatchAugmentd(["moving_image", "fixed_image"], 0, 0, 0, deform=1.0)
    known = RandSelfPaird(prob=1.0)
    assert chain_batch_transforms(None, None) is None
    assert chain_batch_transforms(spatial, None) is spatial
    out = chain_batch_transforms(spatial, known)(_batch((16, 16)))
    assert "target_map" in out
    with pytest.raises(TypeError, match="callable"):
        chain_batch_transforms(spatial, 3)


def _trainer(augment, weight, supervision=True, epochs=1):
    torch.manual_seed(0)
    data = TrianglesCirclesDataset(12, (16, 16), seed=0)
    loader = DataLoader(RandomPairDataset(data, 8, seed=0), batch_size=4)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    return ICONTrainer("cpu", epochs, loader, net, torch.optim.Adam(net.parameters(), 1e-3), ICONLoss("mse", 16),
                       augment=augment, decollate=False,
                       map_supervision=MapSupervisionLoss() if supervision else None, map_supervision_weight=weight)


def test_trainer_adds_the_weighted_map_error_to_the_icon_loss():
    from ignite.engine import Events

    steps = {}
    for weight in (0.0, 2.0):
        trainer = _trainer(RandSelfPaird(prob=1.0, deform=1.5), weight=weight)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e, w=weight: steps.setdefault(w, (
            float(e.state.output["loss"]), float(e.state.output["map_error"]))))
        trainer.run()
    # same seeds: the first step's batch, network and ICON loss are the same; its total is ICON + weight * error
    assert steps[0.0][1] > 0.5  # a fresh network is near the identity: relative error near 1
    assert steps[2.0][1] == pytest.approx(steps[0.0][1], rel=1e-6)
    assert steps[2.0][0] == pytest.approx(steps[0.0][0] + 2.0 * steps[0.0][1], rel=1e-5)
    with pytest.raises(ValueError, match="RandSelfPaird"):
        _trainer(None, weight=1.0).run()
    with pytest.raises(ValueError, match="map_supervision_weight"):
        _trainer(None, weight=-1.0)
    with pytest.raises(TypeError, match="MapSupervisionLoss"):
        ICONTrainer("cpu", 1, [], torch.nn.Identity(), torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
                    ICONLoss("mse", 16), map_supervision=torch.nn.MSELoss())


def test_map_supervision_teaches_a_known_deformation_faster():
    """80 steps with the known maps bring phi_AB closer to them than the same steps without (a check of sign and
    wiring, not of accuracy: triangles and circles of 16 x 16 pixels, displacements of about 1.5 pixels)."""
    from ignite.engine import Events

    errors = {}
    for weight in (0.0, 5.0):
        trainer = _trainer(RandSelfPaird(prob=1.0, deform=1.5, seed=1), weight=weight, epochs=40)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e, w=weight: errors.setdefault(w, []).append(
            float(e.state.output["map_error"])))
        trainer.run()
    last = {w: sum(e[-20:]) / 20 for w, e in errors.items()}
    assert last[5.0] < last[0.0] - 0.03
