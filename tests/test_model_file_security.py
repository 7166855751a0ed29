"""A model file is data: loading one must never run code from it (nor import anything outside the allow-list)."""

import subprocess
import sys

import pytest
import torch

from monai_icon.apps import load_registration_model, save_registration_model
from monai_icon.apps.register import MODEL_FORMAT
from monai_icon.networks import multistep_registration
from monai_icon.networks.spec import build_network, check_network_spec

from conftest import ROOT

TINY = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}


def _model_file(path, network_def, state_dict=None):
    """A file as a crafted download would be: a valid format tag and weights, and the given network_def."""
    state_dict = multistep_registration(**TINY).state_dict() if state_dict is None else state_dict
    torch.save({"format": MODEL_FORMAT, "network_def": network_def, "state_dict": state_dict,
                "settings": {"spatial_size": [16, 16, 8]}}, path)
    return path


def _malicious_defs(marker):
    touch = f"open({str(marker)!r}, 'w').write('ran')"
    plain = {"_target_": "monai_icon.networks.multistep_registration", **TINY}
    return {
        "dollar expression": {**plain, "coarse_steps": f"$__import__('builtins').{touch}"},
        "dollar expression with spaces": {**plain, "fine_steps": f"  $ {touch}"},
        "foreign target": {"_target_": "os.system", "command": f"touch {marker}"},
        "target outside the allow-list (builtins.exec)": {"_target_": "builtins.exec", "source": touch},
        "allowed prefix but not a network": {"_target_": "monai_icon.networks.pretrained.load", "path": str(marker)},
        "reference": {**plain, "coarse_steps": "@something"},
        "macro": {**plain, "coarse_steps": "%other.json#key"},
        "nested inside kwargs": {
            "_target_": "monai_icon.networks.RegistrationNet",
            "block": {"_target_": "monai_icon.networks.DisplacementField",
                      "net": {"_target_": "monai_icon.networks.nets.UNet", "spatial_dims": f"${touch}"}},
        },
        "nested in a list": {**plain, "encoder_channels": [4, {"_target_": "subprocess.call", "args": ["true"]}]},
        "requires directive": {**plain, "_requires_": f"${touch}"},
        "disabled directive": {**plain, "_disabled_": "$True"},
        "file path the loader would read": {**plain, "coarse_weights": str(marker)},
        "not a dict": f"${touch}",
        "dotted trick": {"_target_": "torch.nn.__class__.__subclasses__"},
    }


@pytest.mark.parametrize("case", list(_malicious_defs("x")))
def test_malicious_model_files_are_refused_and_nothing_runs(tmp_path, case):
    marker = tmp_path / "side_effect"
    path = _model_file(tmp_path / "evil.pt", _malicious_defs(marker)[case])
    with pytest.raises(ValueError, match="refusing the network spec at .*network_def"):
        load_registration_model(path)
    assert not marker.exists(), f"loading the model file ran code ({case})"


def test_refusal_names_the_offending_entry(tmp_path):
    spec = _malicious_defs(tmp_path / "m")["nested inside kwargs"]
    with pytest.raises(ValueError, match=r"network_def\.block\.net\.spatial_dims"):
        check_network_spec(spec)
    with pytest.raises(ValueError, match=r"network_def\._target_: 'os.system'"):
        check_network_spec({"_target_": "os.system"})


def test_cli_refuses_a_malicious_model_file_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    spec = {"_target_": "monai_icon.networks.multistep_registration",
            "coarse_steps": f"$__import__('os').system('touch {marker}')"}
    path = _model_file(tmp_path / "evil.pt", spec)
    image = tmp_path / "img.nii.gz"
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.random.rand(16, 16, 8).astype(np.float32), np.eye(4)), image)
    out = subprocess.run([sys.executable, "-m", "monai_icon", "register", "--fixed", str(image), "--moving", str(image),
                          "--model", str(path), "--warped", str(tmp_path / "w.nii.gz")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "refusing the network spec" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists() and not (tmp_path / "w.nii.gz").exists()


def test_plain_specs_still_build_and_save_refuses_what_load_would_refuse(tmp_path):
    network = build_network({"_target_": "monai_icon.networks.RegistrationNet",
                             "block": {"_target_": "monai_icon.networks.DisplacementField",
                                       "net": {"_target_": "monai_icon.networks.nets.UNet", "spatial_dims": 2}}})
    assert network.eval()(torch.rand(1, 2, 28, 28)).shape == (1, 2, 28, 28)
    # a file written by earlier versions (a plain dict spec) keeps loading
    path = _model_file(tmp_path / "old.pt", {"_target_": "monai_icon.networks.multistep_registration", **TINY})
    assert load_registration_model(path).spatial_size == (16, 16, 8)
    with pytest.raises(ValueError, match="refusing"):
        save_registration_model(tmp_path / "bad.pt", multistep_registration(**TINY),
                                {"_target_": "monai_icon.networks.multistep_registration", "coarse_steps": "$1"},
                                spatial_size=(16, 16, 8))
    assert not (tmp_path / "bad.pt").exists()
