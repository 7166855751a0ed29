import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class FixedDisplacementNet(torch.nn.Module):
    """A stand-in network returning a displacement that depends on its inputs in a known, smooth way."""

    def __init__(self, scale: float = 0.05) -> None:
        super().__init__()
        self.scale = scale
        self.calls = []

    def forward(self, image_A, image_B=None):
        self.calls.append(tuple(image_A.shape))
        dims = image_A.ndim - 2
        d = torch.tanh(image_A - image_B)[:, :1]
        return self.scale * torch.cat([d * (k + 1) for k in range(dims)], dim=1)


@pytest.fixture
def fixed_net():
    return FixedDisplacementNet


def smooth_random_field(batch, shape, amplitude=0.05, generator=None):
    """A smooth random displacement [B, D, *shape] in [0, 1] units (low-frequency noise upsampled)."""
    dims = len(shape)
    coarse = torch.randn(batch, dims, *([4] * dims), generator=generator) * amplitude
    mode = "bilinear" if dims == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)


def run_bundle(*args: str, check: bool = True, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` in a subprocess (unbuffered output, captured as text); with ``check``, a
    failure raises an AssertionError carrying the tails of stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"monai.bundle {' '.join(args[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def labelled_pairs_and_tiny_model(tmp_path: Path, num_pairs: int, spatial_size: tuple) -> tuple[Path, Path]:
    """A ``monai-icon datalist`` JSON of deformed copies of the embedded T1 head (labelled test pairs) and a
    model file of a tiny, zero-initialised (identity) multi-step network on ``spatial_size``."""
    from monai_icon.apps import save_registration_model
    from monai_icon.data import build_knee_datalist, write_datalist, write_deformed_copies
    from monai_icon.networks import multistep_registration

    write_deformed_copies(tmp_path / "vols", num_copies=3, deformation_mm=6.0, seed=1)
    datalist = write_datalist(build_knee_datalist(tmp_path / "vols", 0.34, num_pairs, require_side=False,
                                                  relative_to=tmp_path), tmp_path / "d.json")
    tiny = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
    model = save_registration_model(tmp_path / "m.pt", multistep_registration(**tiny),
                                    {"_target_": "monai_icon.networks.multistep_registration", **tiny},
                                    spatial_size=spatial_size)
    return Path(datalist), Path(model)


def activate_backend(monkeypatch, **fields: bool) -> None:
    """For the rest of the test, the CPU backend's settings outside any ``use_backend`` are the defaults with
    ``fields`` changed (``monai_icon.backend.settings``: a fresh context variable, restored after the test)."""
    import contextvars
    import dataclasses

    from monai_icon.backend import settings

    default = dataclasses.replace(settings.DEFAULT, **fields)
    monkeypatch.setattr(settings, "_ACTIVE", contextvars.ContextVar("test_cpu_backend", default=default))


def assert_trainer_iterates_inside_a_context_only_when_asked(flag: str, value: bool, state: dict) -> None:
    """A tiny 3D ``ICONTrainer`` built with ``flag=value`` runs each iteration with ``state["enabled"] == value``
    (seen from its augmentation), leaves it off afterwards, and refuses a string for ``flag``."""
    from torch.utils.data import DataLoader

    from monai_icon.data import RandomPairDataset
    from monai_icon.engines import ICONTrainer
    from monai_icon.losses import ICONLoss
    from monai_icon.networks import DisplacementField, RegistrationNet
    from monai_icon.networks.nets import UNet

    items = [{"image": torch.rand(1, 8, 8, 8)} for _ in range(3)]
    loader = DataLoader(RandomPairDataset(items, 2, keys=("image",), seed=0), batch_size=2)
    net = RegistrationNet(DisplacementField(UNet(3, encoder_channels=(4, 8), decoder_channels=(8, 4))))
    seen = []
    loss = ICONLoss("lncc", 1.0, spatial_dims=3)
    trainer = ICONTrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), loss,
                          augment=lambda batch: seen.append(state["enabled"]) or batch, decollate=False,
                          **{flag: value})
    trainer.run()
    assert seen == [value] and state["enabled"] is False
    with pytest.raises(TypeError, match=flag):
        ICONTrainer("cpu", 1, loader, net, torch.optim.Adam(net.parameters()), ICONLoss("lncc", 1.0, spatial_dims=3),
                    **{flag: "yes"})
