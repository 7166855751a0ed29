"""Reading yes/no settings from configs and command lines, and the trainer's own checks of them."""

import pytest
import torch

from monai_icon.config import as_bool, cuda_amp
from monai_icon.engines import ICONTrainer
from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField
from monai_icon.networks.nets import UNet


@pytest.mark.parametrize(
    "value,expected",
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("False", False), (" YES ", True),
     ("no", False), ("t", True), ("n", False), ("1", True), ("0", False)],
)
def test_as_bool_reads_command_line_spellings(value, expected):
    assert as_bool(value) is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, None, 0.5])
def test_as_bool_rejects_anything_else_naming_the_setting(value):
    with pytest.raises(ValueError, match=r"resume must be true or false, got"):
        as_bool(value, "resume")


def test_cuda_amp_is_on_only_for_cuda_devices():
    for device in ("cuda", "cuda:1", torch.device("cuda:0")):
        assert cuda_amp(True, device) is True and cuda_amp("true", device) is True
        assert cuda_amp(False, device) is False and cuda_amp("false", device) is False
    for device in ("cpu", torch.device("cpu"), "meta"):
        assert cuda_amp(True, device) is False
    with pytest.raises(ValueError, match="amp must be true or false"):
        cuda_amp("sometimes", "cuda")


@pytest.mark.parametrize("name", ["compile", "channels_last"])
def test_trainer_refuses_a_string_for_a_switch(name):
    net = DisplacementField(UNet(2, encoder_channels=(8,), decoder_channels=(8,)))
    with pytest.raises(TypeError, match=f"{name} must be a bool, got 'false'"):
        ICONTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 1e-3), ICONLoss("mse", 1.0), **{name: "false"})


def test_as_count():
    from monai_icon.config import as_count

    assert as_count(3, "n") == 3 and as_count(" 4 ", "n") == 4 and as_count("0", "n", minimum=0) == 0
    for bad in (0, "0", -2, 1.5, "1.5", True, "two", None):
        with pytest.raises(ValueError, match="val_interval must be an integer >= 1"):
            as_count(bad, "val_interval")
