"""End to end: a U-Net trained with ICONLoss on small triangles & circles registers them without folding."""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from monai_icon.data import RandomPairDataset, TrianglesCirclesDataset
from monai_icon.losses import ICONLoss
from monai_icon.metrics import count_folds, threshold_dice
from monai_icon.networks import DisplacementField
from monai_icon.networks.nets import UNet
from monai_icon.visualize import save_registration_figure

ROOT = Path(__file__).resolve().parents[1]


def _evaluate(model, batch):
    model.eval()
    with torch.no_grad():
        a, b = batch["moving_image"], batch["fixed_image"]
        phi = model(a, b)
        warped = phi.warp(a)
        result = threshold_dice(a, b).mean(), threshold_dice(warped, b).mean(), count_folds(phi.grid(a.shape[2:]))
    model.train()
    return result


def test_unet_icon_training_improves_dice_without_folds():
    torch.manual_seed(0)
    size = (32, 32)
    model = DisplacementField(UNet(2))
    loss_fn = ICONLoss("mse", lmbda=1024)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    train = DataLoader(RandomPairDataset(TrianglesCirclesDataset(500, size, seed=0), 250 * 16), batch_size=16)
    test_batch = next(
        iter(DataLoader(RandomPairDataset(TrianglesCirclesDataset(64, size, seed=1), 64, seed=0), batch_size=64))
    )
    for batch in train:
        a, b = batch["moving_image"], batch["fixed_image"]
        out = loss_fn(a, b, model(a, b), model(b, a))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    before, after, folds = _evaluate(model, test_batch)
    # measured: Dice 0.49 -> 0.75 with about 1 folded cell per image (of 961 cells)
    assert after > before + 0.15, (before, after)
    assert folds.mean() < 2.5, folds


def test_figure_is_written(tmp_path):
    a = torch.rand(2, 1, 16, 20)
    disp = 0.05 * torch.randn(2, 2, 4, 5)
    disp = torch.nn.functional.interpolate(disp, size=(16, 20), mode="bilinear", align_corners=True)
    from monai_icon.networks.maps import DisplacementMap

    phi = DisplacementMap(disp)
    path = save_registration_figure(tmp_path / "fig.png", a, a, phi.warp(a), phi.grid((16, 20)))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_example_script_runs(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_icon_2d
    finally:
        sys.path.pop(0)
    results = train_icon_2d.main(
        ["--steps", "3", "--batch-size", "4", "--test-pairs", "8", "--output-dir", str(tmp_path), "--device", "cpu"]
    )
    printed = capsys.readouterr().out
    assert "Dice after registration" in printed and "folds per image" in printed
    assert set(results) == {"dice_unregistered", "dice", "folds_per_image"}
    assert (tmp_path / "registration.png").is_file() and (tmp_path / "model.pt").is_file()
