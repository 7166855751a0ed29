"""register_files / register_pairs with their settings as values (PairFiles, OutputFiles, Refinement), the loose
keywords they replace, and the one check of a registration's arguments that the Python API and the CLI share."""

import inspect
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_icon.apps import OutputFiles, PairFiles, Refinement, register_files, register_images, register_pairs
from monai_icon.apps.cli import _apply_presets, _refinement, build_parser, main
from monai_icon.apps.validation import FLAG_NAMES, check_registration_arguments
from test_register_files import _save, _shifted_balls_and_identity_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two files of a shifted ball with labels and all-ones masks, and a model file of a tiny network on 12x12x6."""
    folder = tmp_path_factory.mktemp("values")
    fixed, moving, model = _shifted_balls_and_identity_model(folder, (12, 12, 6))
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for role, path in (("fixed", fixed), ("moving", moving)):
        image = np.asarray(nib.load(path).dataobj)
        _save(folder / f"{role}_label.nii.gz", (image > 0.5).astype(np.uint8), affine)
        _save(folder / f"{role}_mask.nii.gz", np.ones(image.shape, np.uint8), affine)
    return {"folder": folder, "fixed": fixed, "moving": moving, "model": str(model),
            **{f"{r}_{k}": str(folder / f"{r}_{k}.nii.gz") for r in ("fixed", "moving") for k in ("label", "mask")}}


def _arrays(summary):
    return {role: np.asarray(nib.load(path).dataobj) for role, path in summary["written"].items()}


def test_values_and_keywords_give_the_same_outputs(pair, tmp_path):
    """The same registration (labels, masks, label-supervised residual refinement) called with the values and with
    the loose keywords writes the same files."""
    refinement = Refinement(steps=2, lr=5e-3, mode="residual", size=(24, 24, 12), levels=2, field_size=(12, 12, 6))
    files = {k: pair[k] for k in ("fixed_label", "moving_label", "fixed_mask", "moving_mask")}
    results = {}
    for style in ("values", "keywords"):
        out = {"warped": tmp_path / f"{style}_w.nii.gz", "ddf": tmp_path / f"{style}_d.nii.gz",
               "warped_label": tmp_path / f"{style}_l.nii.gz"}
        torch.manual_seed(0)
        if style == "values":
            summary = register_files(inputs=PairFiles(pair["fixed"], pair["moving"], **files),
                                     outputs=OutputFiles(**out), model=pair["model"], refinement=refinement,
                                     label_weight=0.5)
        else:
            summary = register_files(pair["fixed"], pair["moving"], pair["model"], **files, **out,
                                     **refinement.arguments(), label_weight=0.5)
        assert sorted(summary["written"]) == ["ddf", "warped", "warped_label"] and len(summary["io_losses"]) == 2
        results[style] = (summary, _arrays(summary))
    (values, written_values), (keywords, written_keywords) = results["values"], results["keywords"]
    assert values["io_losses"] == keywords["io_losses"] and values["folds_percent"] == keywords["folds_percent"]
    for role in written_values:
        np.testing.assert_array_equal(written_values[role], written_keywords[role])


def test_register_pairs_takes_a_refinement_or_its_keywords(pair, tmp_path):
    pairs = [{"fixed_image": pair["fixed"], "moving_image": pair["moving"], "pair_id": "p"}]
    refinement = Refinement(steps=2, lr=5e-3, mode="residual")
    (by_value,) = register_pairs(pairs, pair["model"], tmp_path / "value", refinement=refinement)
    (by_keywords,) = register_pairs(pairs, pair["model"], tmp_path / "keywords", io_steps=2, io_lr=5e-3,
                                    io_mode="residual")
    assert by_value["io_losses"] == by_keywords["io_losses"]
    with pytest.raises(ValueError, match=r"either as refinement= or as \['io_steps'\]"):
        register_pairs(pairs, pair["model"], tmp_path / "x", refinement=refinement, io_steps=3)
    with pytest.raises(TypeError, match="io_stepz"):
        register_pairs(pairs, pair["model"], tmp_path / "x", io_stepz=3)
    with pytest.raises(ValueError, match="io_steps must be an integer >= 0"):  # before any pair
        register_pairs(pairs, pair["model"], tmp_path / "x", io_steps=-1)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"inputs": "pair", "fixed_mask": "m.nii.gz"}, r"input files either as inputs= or as \['fixed_mask'\]"),
    ({"inputs": "pair", "fixed": "f.nii.gz"}, r"input files either as inputs= or as \['fixed'\]"),
    ({"outputs": OutputFiles(warped="w.nii.gz"), "ddf": "d.nii.gz"}, r"either as outputs= or as \['ddf'\]"),
    ({"refinement": Refinement(steps=1), "io_mode": "residual"}, r"either as refinement= or as \['io_mode'\]"),
])
def test_a_value_mixed_with_keywords_for_its_settings_is_refused(pair, tmp_path, kwargs, message):
    kwargs = {"inputs": PairFiles(pair["fixed"], pair["moving"]), **kwargs} if kwargs.get("inputs") else \
        {"fixed": pair["fixed"], "moving": pair["moving"], **kwargs}
    kwargs.setdefault("outputs", OutputFiles(warped=tmp_path / "w.nii.gz"))
    with pytest.raises(ValueError, match=message):
        register_files(model=pair["model"], **kwargs)
    assert not list(tmp_path.iterdir())


def test_missing_images_model_and_unknown_keywords_are_type_errors(pair, tmp_path):
    with pytest.raises(TypeError, match="fixed and moving images"):
        register_files(moving=pair["moving"], model=pair["model"], warped=tmp_path / "w.nii.gz")
    with pytest.raises(TypeError, match="needs a model"):
        register_files(pair["fixed"], pair["moving"], warped=tmp_path / "w.nii.gz")
    with pytest.raises(TypeError, match="warpd"):
        register_files(pair["fixed"], pair["moving"], pair["model"], warpd=tmp_path / "w.nii.gz")


# (Python keywords, CLI flags, the setting the CLI's message names by its flag): one bad argument each; both are
# refused with one message, the same but for that name
BAD = {
    "negative steps": ({"io_steps": -1}, ["--io-steps", "-1"], "io_steps"),
    "NaN learning rate": ({"io_lr": math.nan}, ["--io-lr", "nan"], "io_lr"),
    "zero levels": ({"io_levels": 0}, ["--io-levels", "0"], "io_levels"),
    "levels without residual": ({"io_levels": 3}, ["--io-levels", "3"], None),
    "negative fine steps": ({"io_mode": "residual", "io_size": (12, 12, 6), "io_fine_steps": -1},
                            ["--io-mode", "residual", "--io-size", "12,12,6", "--io-fine-steps", "-1"],
                            "io_fine_steps"),
    "one-voxel io size": ({"io_mode": "residual", "io_size": (1, 12, 6)},
                          ["--io-mode", "residual", "--io-size", "1,12,6"], "io_size"),
    "io size without residual": ({"io_size": (24, 24, 12)}, ["--io-size", "24,24,12"], "io_size"),
    "io size of another dimension": ({"io_mode": "residual", "io_size": (24, 24)},
                                     ["--io-mode", "residual", "--io-size", "24,24"], "io_size"),
    "more levels than the grid has": ({"io_mode": "residual", "io_steps": 1, "io_levels": 9},
                                      ["--io-mode", "residual", "--io-steps", "1", "--io-levels", "9"], "io_levels"),
    "negative label weight": ({"label_weight": -1.0}, ["--label-weight", "-1"], None),
    "label weight without labels": ({"label_weight": 1.0, "io_steps": 1}, ["--label-weight", "1", "--io-steps", "1"],
                                    None),
    "side": ({"fixed_side": "UP"}, ["--fixed-side", "UP"], None),
    "one mask": ({"fixed_mask": "{fixed_mask}"}, ["--fixed-mask", "{fixed_mask}"], None),
    "output over an input": ({"ddf": "{moving}"}, ["--ddf", "{moving}"], None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_the_cli_and_the_python_api_refuse_the_same_arguments_with_the_same_message(pair, tmp_path, capsys, case):
    kwargs, flags, renamed = BAD[case]
    kwargs = {k: v.format(**pair) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as refused:
        register_files(pair["fixed"], pair["moving"], pair["model"], warped=tmp_path / "w.nii.gz", **kwargs)
    expected = str(refused.value)
    if renamed is not None:
        assert expected.startswith(f"{renamed} "), expected
        expected = FLAG_NAMES[renamed] + expected[len(renamed):]
    argv = ["register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--model", pair["model"], "--warped",
            str(tmp_path / "w.nii.gz"), *(f.format(**pair) for f in flags)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"monai-icon register: error: {expected}\n"
    assert not list(tmp_path.iterdir())


def test_one_default_per_setting():
    """The command line without flags, register_files, register_images and register_pairs all start from the
    defaults of Refinement (the learning rate: DEFAULT_IO_LR of the mode) and label_weight 0."""
    args = build_parser().parse_args(["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--model", "m.pt"])
    _apply_presets(args)
    assert _refinement(args) == Refinement()
    assert args.label_weight == inspect.signature(register_files).parameters["label_weight"].default == 0.0
    defaults = Refinement().arguments()
    images = inspect.signature(register_images).parameters
    loose = {k: v for k, v in defaults.items() if k not in ("io_smoothness", "io_voxels")}  # only in refinement=
    assert {k: images[k].default for k in loose} == loose and images["refinement"].default is None
    assert check_registration_arguments(Refinement()).lr == 2e-5
    assert check_registration_arguments(Refinement(mode="residual")).lr == 2e-3
    assert check_registration_arguments(Refinement(mode="one-way")).lr == 7e-3


def test_values_are_exported_frozen_and_merge_keywords():
    import dataclasses

    import monai_icon.apps as apps

    assert {"PairFiles", "OutputFiles", "Refinement"} <= set(apps.__all__)
    files = PairFiles("f.nii.gz", "m.nii.gz")
    with pytest.raises(dataclasses.FrozenInstanceError):
        files.fixed = "x"  # type: ignore[misc]
    assert PairFiles.merge(None, fixed="f.nii.gz", moving="m.nii.gz", fixed_side=None) == files
    assert OutputFiles.merge(None, warped="w.nii.gz", ddf=None) == OutputFiles(warped="w.nii.gz")
    roles = OutputFiles(warped="w").roles()
    assert json.dumps(roles) == '{"warped": "w", "ddf": null, "transform": null, "warped_label": null}'
