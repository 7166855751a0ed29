"""The training recipe's pieces: schedules, lambda continuation, progress output, instance optimisation."""

import io
import math

import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader

from monai_icon.data import RandomPairDataset, TrianglesCirclesDataset
from monai_icon.engines import ICONEvaluator, ICONTrainer
from monai_icon.engines.instance_optimisation import WeightSnapshot, instance_optimise
from monai_icon.handlers import LambdaScheduleHandler, LearningRateScheduleHandler, ProgressHandler, ThresholdDice
from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField, RegistrationNet
from monai_icon.networks.nets import UNet
from monai_icon.schedules import lambda_at, lr_factor_at


def _net(seed=0):
    torch.manual_seed(seed)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    with torch.no_grad():
        net.block.net.out.weight.normal_(0, 0.01)
    return net


def _loader(n=8, seed=None, batch_size=4):
    data = TrianglesCirclesDataset(20, (16, 16), seed=0)
    return DataLoader(RandomPairDataset(data, n, seed=seed), batch_size=batch_size)


def test_lr_factor_warmup_then_cosine_and_errors():
    assert lr_factor_at(0, 100, warmup=9) == pytest.approx(0.1)
    assert lr_factor_at(9, 100, warmup=9) == pytest.approx(1.0)  # first step after the warm-up
    assert lr_factor_at(50, 100, warmup=0, schedule="constant") == 1.0
    assert lr_factor_at(50, 100, warmup=0, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor_at(100, 100, schedule="cosine", final_fraction=0.1) == pytest.approx(0.1)
    assert lr_factor_at(500, 100, schedule="cosine") == pytest.approx(0.0)  # after the planned end: stays there
    factors = [lr_factor_at(s, 100, 10, "cosine") for s in range(100)]
    assert max(factors) == pytest.approx(1.0) and all(b <= a for a, b in zip(factors[10:], factors[11:]))
    for kwargs, message in [({"schedule": "step"}, "unknown learning-rate schedule"), ({"warmup": -1}, "warmup"),
                            ({"final_fraction": 2.0}, "final_fraction")]:
        with pytest.raises(ValueError, match=message):
            lr_factor_at(0, 10, **kwargs)
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor_at(0, 0)


def test_learning_rate_handler_follows_the_iteration_from_the_base_lr():
    net = _net()
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    trainer = ICONTrainer("cpu", 2, _loader(8), net, optimizer, ICONLoss("mse", 8))
    LearningRateScheduleHandler(optimizer, total_steps=4, warmup=1, schedule="cosine").attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert seen == pytest.approx([1e-3 * lr_factor_at(s, 4, 1, "cosine") for s in range(4)])
    optimizer.param_groups[0]["lr"] = 123.0  # what a checkpoint would restore is not the base
    trainer.state.iteration = 2
    trainer._fire_event(Events.ITERATION_STARTED)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor_at(1, 4, 1, "cosine"))
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        LearningRateScheduleHandler(optimizer, 4, schedule="linear")


def test_lambda_continuation_is_geometric_then_constant():
    assert lambda_at(0, 100, 16, 512, 0.5) == pytest.approx(16)
    assert lambda_at(25, 100, 16, 512, 0.5) == pytest.approx(math.sqrt(16 * 512))
    assert lambda_at(50, 100, 16, 512, 0.5) == 512 and lambda_at(99, 100, 16, 512, 0.5) == 512
    assert lambda_at(0, 100, 16, 512, 0.0) == 512
    with pytest.raises(ValueError, match="must be > 0"):
        lambda_at(0, 100, 0, 512, 0.5)
    with pytest.raises(ValueError, match="ramp_fraction"):
        lambda_at(0, 100, 16, 512, 1.5)


def test_lambda_schedule_handler_drives_the_trainers_loss_and_resumes():
    net = _net()
    loss = ICONLoss("mse", 1.0)
    trainer = ICONTrainer("cpu", 2, _loader(8), net, torch.optim.Adam(net.parameters(), 1e-3), loss)
    seen = []
    handler = LambdaScheduleHandler(loss, start=4.0, target=64.0, ramp_fraction=0.5, total_steps=4)
    handler.attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(e.state.output[0]["lmbda"])))
    trainer.run()
    assert seen == pytest.approx([4.0, 16.0, 64.0, 64.0])
    # the value is a function of the iteration: a resumed engine continues on the schedule
    loss.lmbda = 1.0
    trainer.state.iteration = 1
    handler(trainer)
    assert loss.lmbda == pytest.approx(4.0)
    with pytest.raises(ValueError, match="lmbda"):
        LambdaScheduleHandler(object(), 1, 2, 0.5, 10)


def test_progress_handler_prints_one_line_per_epoch_off_a_terminal():
    net = _net()
    stream = io.StringIO()  # not a terminal: a line per epoch instead of per-step bar updates
    trainer = ICONTrainer("cpu", 3, _loader(8), net, torch.optim.Adam(net.parameters(), 1e-3), ICONLoss("mse", 8))
    ProgressHandler(output_transform=lambda out: {"loss": out[0]["loss"]}, stream=stream).attach(trainer)
    trainer.run()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: iteration 2/6, loss ")
    assert "s/it)" in lines[-1]
    with pytest.raises(ValueError, match="force"):
        ProgressHandler(force="sometimes")


def test_weight_snapshot_restores_in_place_and_skips_frozen_parameters():
    net = _net()
    net.block.net.down[0].conv.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    snapshot = WeightSnapshot(net)
    assert all(p.requires_grad for p, _ in snapshot.saved)
    assert len(snapshot.saved) == sum(p.requires_grad for p in net.parameters())
    moving, fixed = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    history = instance_optimise(net.eval(), moving, fixed, ICONLoss("mse", 8), steps=3, lr=1e-3)
    assert len(history) == 3
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    snapshot.restore()
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    with pytest.raises(ValueError, match="steps"):
        instance_optimise(net, moving, fixed, ICONLoss("mse", 8), steps=-1)
    with pytest.raises(ValueError, match="learning rate"):
        instance_optimise(net, moving, fixed, ICONLoss("mse", 8), steps=1, lr=float("nan"))


def test_evaluator_instance_optimisation_per_pair_restores_weights():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    results = {}
    for steps in (0, 10):
        torch.manual_seed(1)  # the loss draws random off-grid points
        evaluator = ICONEvaluator("cpu", _loader(4, seed=0, batch_size=2), net,
                                  loss_function=ICONLoss("mse", 8, reduction="none"),
                                  key_val_metric={"dice": ThresholdDice()}, io_steps=steps, io_lr=1e-2)
        evaluator.run()
        results[steps] = evaluator.state.metrics["dice"]
        for k, v in net.state_dict().items():
            assert torch.equal(before[k], v), k  # restored after every pair
    assert results[10] > results[0]
    # per pair: the same pairs in batches of one or of two give the same instance-optimised result (no
    # loss_function, so only instance optimisation draws random off-grid points, in the same order)
    dice = []
    for batch_size in (1, 2):
        torch.manual_seed(1)
        evaluator = ICONEvaluator("cpu", _loader(4, seed=0, batch_size=batch_size), net, io_loss=ICONLoss("mse", 8),
                                  key_val_metric={"dice": ThresholdDice()}, io_steps=10, io_lr=1e-2)
        evaluator.run()
        dice.append(evaluator.state.metrics["dice"])
    assert dice[0] == pytest.approx(dice[1], abs=1e-5)
    for kwargs, message in [({"io_steps": -1}, "io_steps"), ({"io_steps": 2, "io_lr": 0.0}, "io_lr"),
                            ({"io_steps": 2}, "needs io_loss")]:
        with pytest.raises(ValueError, match=message):
            ICONEvaluator("cpu", _loader(), net, **kwargs)


def test_residual_instance_optimisation_registers_without_touching_the_network():
    """A zero-initialised (identity) network and a disc shifted by 2 pixels: optimising the residual fields
    alone moves the disc onto the fixed one (both directions inverse consistent), and the weights never change."""
    from monai_icon.engines.instance_optimisation import residual_instance_optimise

    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8)))).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    disc = lambda cy, cx: torch.sigmoid(4.0 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt())[None, None]  # noqa: E731
    moving, fixed = disc(12.0, 10.0), disc(12.0, 12.0)
    torch.manual_seed(0)
    phi_AB, phi_BA, history = residual_instance_optimise(net, moving, fixed, ICONLoss("mse", 8.0), steps=150,
                                                         lr=5e-3)
    assert history[-1] < 0.2 * history[0]
    err_before = float(((moving - fixed) ** 2).mean())
    assert float(((phi_AB.warp(moving) - fixed) ** 2).mean()) < 0.2 * err_before
    assert float(((phi_BA.warp(fixed) - moving) ** 2).mean()) < 0.2 * err_before
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    with pytest.raises(ValueError, match="steps"):
        residual_instance_optimise(net, moving, fixed, ICONLoss("mse", 8.0), steps=-1)


def test_multilevel_field_upsamples_each_level_corner_aligned_and_sums():
    from monai_icon.engines.instance_optimisation import multilevel_field, pyramid_shapes

    assert pyramid_shapes((64, 64, 32), 4) == [(64, 64, 32), (32, 32, 16), (16, 16, 8), (8, 8, 4)]
    assert pyramid_shapes((5, 3), 3) == [(5, 3), (3, 2), (2, 2)]
    # a linear field on a coarse grid is the same linear field on the fine grid (corner-aligned, as the maps are)
    coarse = torch.stack(torch.meshgrid(torch.linspace(0, 1, 3), torch.linspace(0, 1, 4), indexing="ij"))[None]
    fine = torch.stack(torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 1, 7), indexing="ij"))[None]
    assert torch.allclose(multilevel_field([coarse], (9, 7)), fine, atol=1e-6)
    own = torch.randn(1, 2, 9, 7)
    assert torch.allclose(multilevel_field([own, coarse], (9, 7)), own + fine, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        multilevel_field([], (9, 7))


def test_multilevel_residual_registers_a_smooth_shift_in_fewer_steps():
    """A disc shifted by 3 pixels, identity network: in 40 steps the coarse-to-fine residual (4 levels) brings the
    warped disc closer than one free field does at the same learning rate; levels are checked."""
    from monai_icon.engines.instance_optimisation import residual_instance_optimise

    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8)))).eval()
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = lambda cy, cx: torch.sigmoid(5.0 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt())[None, None]  # noqa: E731
    moving, fixed = disc(16.0, 13.0), disc(16.0, 16.0)
    errors = {}
    for levels in (1, 4):
        phi_AB, _, history = residual_instance_optimise(net, moving, fixed, ICONLoss("mse", 8.0), steps=40,
                                                        lr=2e-3, levels=levels)
        errors[levels] = float(((phi_AB.warp(moving) - fixed) ** 2).mean())
        assert len(history) == 40
    assert errors[4] < 0.5 * errors[1], errors
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="levels"):
            residual_instance_optimise(net, moving, fixed, ICONLoss("mse", 8.0), steps=1, levels=bad)


def test_residual_instance_optimisation_samples_a_multistep_map_once_exactly_at_the_grid_points():
    """``sample_network_maps`` (default): the network's multi-step map is evaluated once on the residual grid; at the
    grid points the starting map equals the network's own map, between them it is its linear interpolation;
    without sampling the chain is evaluated exactly everywhere."""
    from monai_icon.engines.instance_optimisation import residual_instance_optimise
    from monai_icon.networks import multistep_registration
    from monai_icon.networks.registration_net import register_pair

    torch.manual_seed(0)
    net = multistep_registration(2, 2, coarse_steps=2, coarse_factor=1, encoder_channels=(4, 8),
                                 decoder_channels=(8, 4)).eval()
    for p in net.parameters():  # a non-trivial map: perturb the zero-initialised output layers
        p.data.add_(0.01 * torch.randn_like(p))
    moving, fixed = torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        exact, _ = register_pair(net, moving, fixed)
        sampled, _, _ = residual_instance_optimise(net, moving, fixed, ICONLoss("mse", 8.0), steps=0)
        unsampled, _, _ = residual_instance_optimise(net, moving, fixed, ICONLoss("mse", 8.0), steps=0,
                                                     sample_network_maps=False)
        assert float((exact.grid((20, 20)) - exact.grid((20, 20)).mean()).abs().max()) > 1e-3  # not the identity
        assert torch.allclose(sampled.grid((20, 20)), exact.grid((20, 20)), atol=1e-5)
        assert torch.allclose(unsampled.grid((37, 29)), exact.grid((37, 29)), atol=1e-5)
        # between the grid points the sampled map is the linear interpolation of the exact one: no further
        # from it than the exact map moves from one grid point to the next
        on_grid = exact.grid((20, 20))
        jump = max(float(on_grid.diff(dim=2).abs().max()), float(on_grid.diff(dim=3).abs().max()))
        assert float((sampled.grid((37, 29)) - exact.grid((37, 29))).abs().max()) <= jump


def test_trainer_label_supervision_uses_batch_labels_and_requires_them():
    data = TrianglesCirclesDataset(12, (16, 16), seed=0)
    labelled = [{"image": data[i]["image"], "label": (data[i]["image"] > 0.5).long()} for i in range(len(data))]
    net = _net()
    loss = ICONLoss("mse", 8.0, label_weight=1.0, num_classes=2)
    seen = []
    trainer = ICONTrainer("cpu", 1, DataLoader(RandomPairDataset(labelled, 8), batch_size=4), net,
                          torch.optim.Adam(net.parameters(), 1e-3), loss)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(float(e.state.output[0]["loss"])))
    trainer.run()
    assert len(seen) == 2
    unlabelled = ICONTrainer("cpu", 1, _loader(8), net, torch.optim.Adam(net.parameters(), 1e-3), loss)
    with pytest.raises(ValueError, match="carries no moving/fixed labels"):
        unlabelled.run()


def test_trainer_masks_from_the_batch_restrict_the_loss_and_can_mask_inputs():
    from monai_icon.engines.trainer import batch_masks

    data = TrianglesCirclesDataset(12, (16, 16), seed=0)
    masked = [{"image": data[i]["image"], "mask": torch.ones(1, 16, 16)} for i in range(len(data))]
    for mask_inputs in (False, True):
        net = _net()
        trainer = ICONTrainer("cpu", 1, DataLoader(RandomPairDataset(masked, 8, keys=("image", "mask")), batch_size=4),
                              net, torch.optim.Adam(net.parameters(), 1e-3), ICONLoss("mse", 8.0),
                              mask_inputs=mask_inputs)
        trainer.run()
        assert trainer.state.iteration == 2
    like = torch.zeros(2, 1, 16, 16)
    assert batch_masks({}, like) == (None, None)
    with pytest.raises(ValueError, match="only one of"):
        batch_masks({"moving_mask": torch.ones(2, 1, 16, 16)}, like)
    with pytest.raises(ValueError, match="fixed_mask must be"):
        batch_masks({"moving_mask": torch.ones(2, 1, 16, 16), "fixed_mask": torch.ones(2, 1, 8, 8)}, like)


def test_instance_optimised_net_is_the_bundle_contract_per_pair_with_weights_restored():
    from monai_icon.engines import InstanceOptimisedNet

    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.cat([torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)], dim=1)
    plain = InstanceOptimisedNet(net, ICONLoss("mse", 8.0), steps=0).eval()
    tuned = InstanceOptimisedNet(net, ICONLoss("mse", 8.0), steps=5, lr=1e-2).eval()
    with torch.no_grad():
        base = plain(x)
    torch.manual_seed(3)
    both = tuned(x)
    assert both.shape == (2, 2, 16, 16) and (both - base).abs().max() > 1e-4
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    torch.manual_seed(3)
    torch.testing.assert_close(torch.cat([tuned(x[:1]), tuned(x[1:])]), both)  # the same, pair by pair
    assert set(tuned.state_dict()) == set(net.state_dict())  # a plain checkpoint loads into the wrapper
    with pytest.raises(ValueError, match="io_steps"):
        InstanceOptimisedNet(net, ICONLoss("mse", 8.0), steps=-1)


def test_residual_instance_optimisation_fine_steps_and_its_errors():
    """``fine_steps``: the steps before the last ``fine_steps`` compare the network's inputs; with ``fine_steps=0`` on
    the inputs' grid it is exactly the run without ``loss_images``, with ``fine_steps=steps`` exactly the run that
    compares ``loss_images`` in every step; bad values and masks with coarse steps are refused."""
    from monai_icon.engines.instance_optimisation import residual_instance_optimise

    net = _net().eval()
    torch.manual_seed(1)
    moving, fixed = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    fine = (torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    loss = ICONLoss("mse", 8.0, regularizer_size=(16, 16))

    def run(**kwargs):
        torch.manual_seed(0)
        phi, _, history = residual_instance_optimise(net, moving, fixed, loss, steps=4, lr=1e-2, shape=(16, 16),
                                                     **kwargs)
        return phi.grid((16, 16)), history

    plain = run()
    none_fine = run(loss_images=fine, fine_steps=0)
    all_fine = run(loss_images=fine, fine_steps=4)
    default = run(loss_images=fine)
    some_fine = run(loss_images=fine, fine_steps=2)
    assert torch.equal(plain[0], none_fine[0]) and plain[1] == none_fine[1]
    assert torch.equal(all_fine[0], default[0]) and all_fine[1] == default[1]
    assert some_fine[1][:2] == plain[1][:2] and some_fine[1][2:] != plain[1][2:]
    for bad in (5, -1, 1.0, True):
        with pytest.raises(ValueError, match="fine_steps"):
            residual_instance_optimise(net, moving, fixed, loss, steps=4, loss_images=fine, fine_steps=bad)
    with pytest.raises(ValueError, match="fine_steps"):
        residual_instance_optimise(net, moving, fixed, loss, steps=4, fine_steps=2)  # no loss_images
    masks = (torch.ones(1, 1, 32, 32), torch.ones(1, 1, 32, 32))
    with pytest.raises(ValueError, match="masks or labels"):
        residual_instance_optimise(net, moving, fixed, loss, steps=4, loss_images=fine, fine_steps=2, masks=masks)


def test_residual_instance_optimisation_coarse_steps_pool_the_images_of_a_network_that_takes_them():
    """A network whose inputs are already the fine images (its own grid finer than the residual fields'): the
    coarse steps compare those images average-pooled onto the fields' grid, which is the run on pooled inputs."""
    import torch.nn.functional as F

    from monai_icon.engines.instance_optimisation import residual_instance_optimise
    from monai_icon.networks.registration_net import register_pair

    net = _net().eval()
    torch.manual_seed(1)
    fine = (torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))
    pooled = tuple(F.avg_pool2d(image, 2) for image in fine)
    seen = []

    class Recording(ICONLoss):
        def forward(self, image_A, image_B, *args, **kwargs):
            seen.append(tuple(image_A.shape[2:]))
            return super().forward(image_A, image_B, *args, **kwargs)

    loss = Recording("mse", 8.0, regularizer_size=(16, 16))
    torch.manual_seed(0)
    _, _, history = residual_instance_optimise(net, *fine, loss, steps=4, lr=1e-2, shape=(16, 16),
                                               loss_images=fine, fine_steps=1)
    assert seen == [(16, 16)] * 3 + [(32, 32)]
    # the coarse steps are those of a refinement of the pooled images (the network's maps are functions: the same
    # maps on both grids up to the network's own input, here the fine images in both runs)
    seen.clear()
    torch.manual_seed(0)
    phi_AB, phi_BA = register_pair(net, *fine)
    _, _, reference = residual_instance_optimise(lambda a, b: (phi_AB, phi_BA), *pooled, loss, steps=3, lr=1e-2,
                                                 shape=(16, 16))
    assert history[:3] == pytest.approx(reference, rel=1e-6)
