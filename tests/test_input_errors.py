"""Bad input gets a clear one-line error, exit status 2, no traceback and nothing written: one table row per case.

Add a case as one row: (arguments with {placeholders}, expected message). Placeholders are files made by the
``files`` fixture (a tiny 3D model, images, a float "label", degenerate volumes, a file where a folder must be).
"""

import os
import stat

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_icon.apps import AtlasSegmentation, save_registration_model
from monai_icon.apps.cli import main
from monai_icon.networks import multistep_registration

TINY = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}


def _nifti(path, array, spacing=(2.0, 2.0, 3.0)):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 8)).astype(np.float32)
    out = d / "out"
    out.mkdir()
    readonly = d / "readonly"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    (d / "a_file").write_text("not a folder")
    return {
        "model": save_registration_model(d / "m.pt", multistep_registration(**TINY),
                                         {"_target_": "monai_icon.networks.multistep_registration", **TINY},
                                         spatial_size=(16, 16, 8)),
        "img": _nifti(d / "img.nii.gz", image),
        "label": _nifti(d / "label.nii.gz", (image * 3).round().astype(np.uint8)),
        "float_label": _nifti(d / "float_label.nii.gz", image),
        "zero_spacing": _nifti(d / "zero_spacing.nii.gz", image, spacing=(2.0, 1e-6, 3.0)),
        "single_slice": _nifti(d / "single_slice.nii.gz", image[:, :, :1]),
        "out": out,
        "readonly": readonly,
        "a_file": d / "a_file",
    }


REGISTER = ["register", "--fixed", "{img}", "--moving", "{img}", "--model", "{model}"]
WARPED = ["--warped", "{out}/w.nii.gz"]

CASES = [
    # counts, sizes and ranges
    (REGISTER + WARPED + ["--io-steps", "-1"], "--io-steps must be an integer >= 0"),
    (REGISTER + WARPED + ["--io-lr", "nan"], "--io-lr must be a finite number > 0"),
    (REGISTER + WARPED + ["--io-levels", "0"], "--io-levels must be an integer >= 1"),
    (REGISTER + WARPED + ["--io-levels", "3"], "io_levels > 1 needs io_mode 'residual' or 'one-way'"),
    (REGISTER + WARPED + ["--lmbda", "nan"], "lmbda must be a finite number >= 0"),
    (REGISTER + WARPED + ["--lmbda", "-1"], "lmbda must be a finite number >= 0"),
    (REGISTER + WARPED + ["--io-lr", "-0.1"], "--io-lr must be a finite number > 0"),
    (REGISTER + WARPED + ["--spatial-size", "0,16,8"], "--spatial-size must be integers >= 2"),
    (REGISTER + WARPED + ["--window", "100,0"], "window must be increasing"),
    (REGISTER + WARPED + ["--window", "5,5"], "empty or reversed range"),
    (REGISTER + WARPED + ["--percentiles", "1,150"], "percentiles must lie within [0.0, 100.0]"),
    (REGISTER + WARPED + ["--fixed-side", "UP"], "fixed_side must be LEFT or RIGHT"),
    (REGISTER + WARPED + ["--moving-side", "middle"], "moving_side must be LEFT or RIGHT"),
    (["synthetic-knees", "{out}/knees", "--subjects", "0"], "--subjects must be an integer >= 1"),
    (["synthetic-knees", "{out}/knees", "--shape", "0,64,32"], "--shape must be integers >= 2"),
    (["synthetic-knees", "{out}/knees", "--shape", "64,64"], "--shape must have 3 values"),
    (["synthetic-knees", "{out}/knees", "--spacing", "1,0,1"], "--spacing must be finite numbers >= 0.001"),
    (["datalist", "{out}", "--output", "{out}/d.json", "--test-fraction", "1.5"], "--test-fraction must lie in"),
    (["datalist", "{out}", "--output", "{out}/d.json", "--test-fraction", "0"], "--test-fraction must lie in (0, 1)"),
    (["datalist", "{out}", "--output", "{out}/d.json", "--test-pairs", "-3"], "--test-pairs must be an integer >= 0"),
    # degenerate geometry and labels
    (["register", "--fixed", "{zero_spacing}", "--moving", "{img}", "--model", "{model}"] + WARPED,
     "degenerate voxel spacing"),
    (["register", "--fixed", "{img}", "--moving", "{single_slice}", "--model", "{model}"] + WARPED,
     "a 3D model needs at least 2 voxels per axis"),
    (REGISTER + ["--moving-label", "{float_label}", "--warped-label", "{out}/wl.nii.gz"], "is not a label map"),
    # a device that is not there
    (REGISTER + WARPED + ["--device", "cuda"], "CUDA is not available"),
    (REGISTER + WARPED + ["--device", "tpu9"], "device"),
    # outputs that cannot be written, found before any computation
    (REGISTER + ["--warped", "{a_file}/w.nii.gz"], "is a file, not a folder"),
    (REGISTER + ["--warped", "{out}/w.xyz"], "unsupported extension"),
    (REGISTER + ["--transform", "{out}/t.nii.gz"], "transform"),
    (REGISTER + ["--warped", "{out}"], "unsupported extension"),
    (REGISTER + ["--warped", "{out}/same.nii.gz", "--ddf", "{out}/same.nii.gz"], "same file"),
    (REGISTER + ["--warped", "{readonly}/w.nii.gz"], "is not writable"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[f"{i:02d}-{m[:30]}" for i, (_, m) in enumerate(CASES)])
def test_bad_input_gets_one_clear_line(files, capsys, argv, message):
    if "CUDA is not available" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "{readonly}" in " ".join(argv) and os.geteuid() == 0:
        pytest.skip("root may write into read-only folders")
    before = sorted(p.name for p in files["out"].rglob("*"))
    code = main([a.format(**files) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in files["out"].rglob("*")) == before  # nothing (half-)written


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"io_steps": -2}, "io_steps must be an integer >= 0"),
        ({"io_lr": 0.0}, "io_lr must be a finite number > 0"),
        ({"atlas_label": torch.rand(1, 16, 16, 8)}, "is not a label map"),
        ({"atlas_image": torch.full((1, 16, 16, 8), float("nan"))}, "NaN"),
        ({"num_classes": 2}, "num_classes is 2"),
    ],
)
def test_atlas_segmentation_rejects_bad_arguments(kwargs, message):
    args = {"atlas_image": torch.rand(1, 16, 16, 8), "atlas_label": torch.randint(0, 3, (1, 16, 16, 8)), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AtlasSegmentation(multistep_registration(**TINY), **args)
