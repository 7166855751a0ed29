import math
import json
from types import SimpleNamespace

import pytest
import torch
from monai.handlers import MeanDice, from_engine
from monai.networks.blocks import Warp
from torch.utils.data import DataLoader

from conftest import smooth_random_field
from monai_icon.data import RandomPairDataset, TrianglesCirclesDataset, load_pair_datalist
from monai_icon.engines import ICONEvaluator, ICONTrainer, PrepareRegistrationBatch
from monai_icon.handlers import (
    AdaptiveLambdaHandler,
    Folds,
    OutputValue,
    ThresholdDice,
    latest_checkpoint,
    require_file,
)
from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField, RegistrationNet
from monai_icon.networks.maps import DisplacementMap, identity_grid, map_grid_to_ddf
from monai_icon.networks.nets import UNet
from monai_icon.transforms import EnsureSameShaped, Warpd


def _loader(n=8, size=(16, 16), seed=None, batch_size=4):
    return DataLoader(RandomPairDataset(TrianglesCirclesDataset(20, size, seed=0), n, seed=seed), batch_size=batch_size)


def test_registration_net_single_tensor_contract():
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    with torch.no_grad():
        net.block.net.out.weight.normal_(0, 0.01)
    net.eval()
    moving, fixed = torch.rand(2, 1, 20, 18), torch.rand(2, 1, 20, 18)
    ddf = net(torch.cat([moving, fixed], 1))
    phi = net.register(moving, fixed)
    assert ddf.shape == (2, 2, 20, 18)
    assert torch.allclose(ddf, phi.ddf((20, 18)))
    assert torch.allclose(Warp("bilinear", "border")(moving, ddf), phi.warp(moving), atol=1e-5)
    phi_ab, phi_ba = net(moving, fixed)
    assert torch.allclose(phi_ba.grid((20, 18)), net.register(fixed, moving).grid((20, 18)))
    with pytest.raises(ValueError, match="cat"):
        net(torch.rand(2, 3, 20, 18))


def test_trainer_outputs_events_and_updates():
    torch.manual_seed(0)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    before = [p.detach().clone() for p in net.parameters()]
    seen = []
    trainer = ICONTrainer(
        "cpu", 1, _loader(), net, torch.optim.Adam(net.parameters(), 1e-3), ICONLoss("mse", 16),
        postprocessing=lambda item: seen.append(sorted(item)) or item,
    )
    trainer.run()
    assert len(seen) == 8  # postprocessing ran on every decollated pair (MODEL_COMPLETED fired)
    out = trainer.state.output
    assert isinstance(out, list) and len(out) == 4
    for key in (
        "loss",
        "similarity",
        "inverse_consistency",
        "folds",
        "lmbda",
        "pred",
        "ddf",
        "moving_image",
        "fixed_image",
    ):
        assert key in out[0]
    assert out[0]["ddf"].shape == (2, 16, 16) and out[0]["lmbda"] == 16
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="ICONLoss"):
        ICONTrainer("cpu", 1, _loader(), net, torch.optim.Adam(net.parameters()), torch.nn.MSELoss())


class _ConstantDDF(torch.nn.Module):
    """A stand-in registration block with a known map: the same displacement for every pair."""

    def __init__(self, displacement):
        super().__init__()
        self.displacement = displacement

    def forward(self, moving, fixed):
        return DisplacementMap(self.displacement.expand(moving.shape[0], *self.displacement.shape[1:]))


def test_evaluator_metrics_on_constructed_inputs():
    shape = (8, 8)
    moving = torch.zeros(2, 1, *shape)
    fixed = torch.zeros(2, 1, *shape)
    moving[:, :, :4] = 1.0  # top half
    fixed[:, :, 2:6] = 1.0  # middle half: Dice 0.5 without registration
    moving_label = (moving > 0.5).long() * 2  # class 2 in the top half
    fixed_label = (fixed > 0.5).long() * 2
    mirrored = identity_grid(shape).clone()
    mirrored[:, 1] = 1 - mirrored[:, 1]  # a map that folds every cell
    block = _ConstantDDF(mirrored - identity_grid(shape))
    batch = [
        {
            "moving_image": moving[i],
            "fixed_image": fixed[i],
            "moving_label": moving_label[i],
            "fixed_label": fixed_label[i],
            "pair_id": f"p{i}",
        }
        for i in range(2)
    ]
    evaluator = ICONEvaluator(
        "cpu",
        DataLoader(batch, batch_size=2),
        block,
        num_classes=3,
        key_val_metric={"dice": ThresholdDice()},
        additional_metrics={
            "folds": Folds(),
            "folds_pct": Folds(percentage=True),
            "time": OutputValue("time"),
            "label_dice": MeanDice(
                include_background=False, output_transform=from_engine(["pred_label", "fixed_label"])
            ),
        },
    )
    evaluator.run()
    m = evaluator.state.metrics
    # the mirror along axis 1 keeps the rows, so the masks still overlap by half
    assert m["dice"] == pytest.approx(0.5)
    assert m["folds"] == pytest.approx(49) and m["folds_pct"] == pytest.approx(100.0)
    assert m["label_dice"] == pytest.approx(0.5)  # class 2 overlaps by half; empty class 1 is ignored (nan)
    assert m["time"] > 0
    with pytest.raises(ValueError, match="num_classes"):
        ICONEvaluator("cpu", DataLoader(batch, batch_size=2), block).run()


def test_evaluator_with_loss_gives_per_pair_similarity():
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    evaluator = ICONEvaluator(
        "cpu", _loader(seed=0), net, loss_function=ICONLoss("mse", 16, reduction="none"),
        key_val_metric={"similarity": OutputValue("similarity")},
    )
    evaluator.run()
    out = evaluator.state.output
    expected = torch.stack([2 * ((o["moving_image"] - o["fixed_image"]) ** 2).mean() for o in out]).mean()
    last_batch = torch.stack([torch.as_tensor(o["similarity"]) for o in out]).mean()
    assert last_batch == pytest.approx(expected.item(), rel=1e-5)  # identity network: sim = 2 * MSE


def test_adaptive_lambda_rule_and_state():
    loss = ICONLoss("mse", 10.0)
    handler = AdaptiveLambdaHandler(loss, threshold=5.0, increment=0.5, max_lmbda=11.2)
    engine = SimpleNamespace(state=SimpleNamespace(output=[{"folds": 4.0}, {"folds": 6.0}], metrics={}))
    handler(engine)  # mean 5 is not above 5
    assert loss.lmbda == 10.0 and engine.state.metrics["lmbda"] == 10.0
    engine.state.output = [{"folds": 4.0}, {"folds": 8.0}]
    handler(engine)
    assert loss.lmbda == 10.5
    engine.state.output = {"folds": torch.tensor([20.0, 30.0])}  # batched output works too
    handler(engine), handler(engine)
    assert loss.lmbda == pytest.approx(11.2)  # capped
    state = handler.state_dict()
    other = ICONLoss("mse", 1.0)
    AdaptiveLambdaHandler(other).load_state_dict(state)
    assert other.lmbda == pytest.approx(11.2)
    with pytest.raises(ValueError, match="lmbda"):
        AdaptiveLambdaHandler(torch.nn.MSELoss())
    engine.state.output = {"folds": torch.full((2,), float("nan"))}  # a loss built with compute_folds=False
    with pytest.raises(ValueError, match="compute_folds=True"):
        handler(engine)


def test_prepare_batch_errors():
    prepare = PrepareRegistrationBatch()
    with pytest.raises(ValueError, match="same shape"):
        prepare({"moving_image": torch.zeros(1, 1, 8, 8), "fixed_image": torch.zeros(1, 1, 8, 9)})
    with pytest.raises(ValueError, match="no 'fixed_image'"):
        prepare({"moving_image": torch.zeros(1, 1, 8, 8)})
    m, f, ml, fl = prepare({"moving_image": torch.zeros(1, 1, 4, 4), "fixed_image": torch.ones(1, 1, 4, 4)})
    assert ml is None and fl is None and f.sum() == 16


def test_warpd_matches_map_warp_and_names_pairs():
    from monai.data import MetaTensor

    shape = (12, 10)
    phi = DisplacementMap(smooth_random_field(1, shape, 0.1))
    ddf = map_grid_to_ddf(phi.grid(shape))[0]
    image = torch.rand(1, *shape)
    d = {
        "moving_image": MetaTensor(image, meta={"filename_or_obj": "/x/a.nii.gz"}),
        "fixed_image": MetaTensor(torch.rand(1, *shape), meta={"filename_or_obj": "/x/b.nii.gz"}),
        "pred": ddf,
    }
    out = Warpd("moving_image", ddf_key="pred", fixed_key="fixed_image")(d)
    assert torch.allclose(out["moving_image_warped"], phi.warp(image[None])[0], atol=1e-5)
    assert out["moving_image_warped"].meta["filename_or_obj"] == "a_to_b"
    assert torch.equal(torch.as_tensor(out["ddf"]), ddf)
    with pytest.raises(ValueError, match="same shape"):
        EnsureSameShaped(["moving_image", "fixed_image"])(
            {"moving_image": torch.zeros(1, 4, 4), "fixed_image": torch.zeros(1, 5, 4)}
        )


def test_pair_datalist_and_file_helpers(tmp_path):
    (tmp_path / "a.nii").write_bytes(b"x")
    (tmp_path / "b.nii").write_bytes(b"x")
    dl = tmp_path / "pairs.json"
    dl.write_text(json.dumps({"pairs": [{"moving_image": "a.nii", "fixed_image": "b.nii"}]}))
    assert load_pair_datalist(dl)[0]["fixed_image"] == str(tmp_path / "b.nii")
    dl.write_text(json.dumps([{"moving_image": "a.nii", "fixed_image": "c.nii"}]))
    with pytest.raises(FileNotFoundError, match="c.nii"):
        load_pair_datalist(dl)
    dl.write_text(json.dumps([{"moving_image": "a.nii"}]))
    with pytest.raises(ValueError, match="fixed_image"):
        load_pair_datalist(dl)
    assert latest_checkpoint(tmp_path / "none") is None
    (tmp_path / "ck").mkdir()
    assert latest_checkpoint(tmp_path / "ck") is None
    import os
    import time

    for i, name in enumerate(("c1.pt", "c2.pt")):
        (tmp_path / "ck" / name).write_bytes(b"x")
        os.utime(tmp_path / "ck" / name, (time.time() + i, time.time() + i))
    assert latest_checkpoint(tmp_path / "ck").endswith("c2.pt")
    with pytest.raises(FileNotFoundError, match="train it"):
        require_file(tmp_path / "model.pt", "train it")


def test_summary_lists_metrics_models_and_newest_figure(tmp_path):
    from monai_icon.reporting import format_summary

    (tmp_path / "model.pt").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    text = format_summary({"val_dice": 0.75, "val_dice_unregistered": 0.4, "val_folds": 0.1}, tmp_path, tmp_path, "T")
    assert "Dice (pixels > 0.5): 0.7500" in text and "Dice before registration: 0.4000" in text
    assert "folds per image" in text and "model.pt" in text and "newest a.png" in text
    assert "no evaluation ran" in format_summary({}, None, None)


def test_symmetric_call_validates_the_pair_once(monkeypatch):
    import monai_icon.networks.blocks as blocks

    calls = []
    original = blocks.check_image_pair
    monkeypatch.setattr(blocks, "check_image_pair", lambda a, b, **k: calls.append(1) or original(a, b, **k))
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    phi_ab, phi_ba = net(a, b)
    assert len(calls) == 1
    assert torch.allclose(phi_ba.grid((16, 16)), net.register(b, a).grid((16, 16)))
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net(bad, b)


def test_gradient_clip_handler_bounds_the_step_gradient():
    from monai.engines.utils import IterationEvents

    from monai_icon.handlers import GradientClipHandler

    torch.manual_seed(0)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    trainer = ICONTrainer("cpu", 1, _loader(), net, torch.optim.SGD(net.parameters(), 1e-3), ICONLoss("mse", 16))
    GradientClipHandler(max_norm=1e-4).attach(trainer)
    norms = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: norms.append(
        float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None]))))
    trainer.run()
    assert trainer.state.grad_norm > 1e-4  # the raw norm, recorded before clipping
    assert len(norms) == 2 and max(norms) <= 1e-4 * (1 + 1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipHandler(0.0)


def test_cpu_amp_runs_the_network_in_bfloat16_and_the_loss_in_float32(monkeypatch):
    from monai_icon import precision

    torch.manual_seed(0)
    net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16), decoder_channels=(16, 8))))
    conv_dtypes, loss_dtypes = set(), set()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
    loss = ICONLoss("mse", 16)
    loss.register_forward_hook(lambda m, i, o: loss_dtypes.add(o.loss.dtype))
    trainer = ICONTrainer("cpu", 1, _loader(n=4), net, torch.optim.Adam(net.parameters(), 1e-3), loss, cpu_amp=True)
    trainer.run()
    assert conv_dtypes == {torch.bfloat16} and loss_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert math.isfinite(trainer.state.output[0]["loss"])
    # off by default; "auto" follows the CPU (bfloat16 only with AMX tiles); on other devices it is ignored
    plain = ICONTrainer("cpu", 1, _loader(n=4), net, torch.optim.Adam(net.parameters()), ICONLoss("mse", 16))
    assert plain.cpu_amp is False
    for fast in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda fast=fast: fast)
        assert precision.resolve_cpu_amp("auto") is fast and precision.cpu_bfloat16_fast() is fast
        auto = ICONTrainer("cpu", 1, _loader(n=4), net, torch.optim.Adam(net.parameters()), ICONLoss("mse", 16),
                           cpu_amp="auto")
        assert auto.cpu_amp is fast
    assert precision.resolve_cpu_amp("false") is False and precision.resolve_cpu_amp("TRUE") is True
    with pytest.raises(ValueError, match="cpu_amp"):
        precision.resolve_cpu_amp("sometimes")
    meta = ICONTrainer("meta", 1, _loader(n=4), net, torch.optim.Adam(net.parameters()), ICONLoss("mse", 16),
                       cpu_amp=True)
    assert meta.cpu_amp is False
