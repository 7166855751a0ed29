"""The recommended test-time settings as one flag each: --ensemble and --refine."""

import pytest

from monai_icon.apps import cli
from monai_icon.apps.presets import (
    RECOMMENDED_ENSEMBLE,
    RECOMMENDED_REFINEMENT,
    SYMMETRIC_REFINEMENT,
    refinement_arguments,
)


def _args(*extra):
    args = cli.build_parser().parse_args(["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--model",
                                          "m.pt", "--warped", "w.nii.gz", *extra])
    cli._apply_presets(args)
    return args


def test_plain_defaults_without_presets():
    args = _args()
    assert (args.io_steps, args.io_mode, args.io_levels, args.passes) == (0, "network", 1, 1)
    assert not args.symmetric and args.flip_axes is None and args.similarity is None and args.io_fine_steps is None
    cli._apply_refinement_grids(args, (32, 16, 32))
    assert args.io_size is None and args.io_field_size is None


def test_refine_sets_the_recommended_refinement_and_explicit_flags_win():
    args = _args("--refine")
    for key, value in RECOMMENDED_REFINEMENT.items():
        assert getattr(args, key) == value, key
    cli._apply_refinement_grids(args, (128, 64, 128))  # the grid is chosen per pair from the fixed image
    assert args.io_size is None and args.io_field_size is None and args.io_voxels == RECOMMENDED_REFINEMENT["io_voxels"]
    mine = _args("--refine", "--io-steps", "10", "--io-smoothness", "3", "--io-field-size", "32,16,32")
    cli._apply_refinement_grids(mine, (128, 64, 128))  # explicit grids replace the one from the fixed image
    assert (mine.io_steps, mine.io_smoothness, mine.io_field_size, mine.io_size) == (10, 3.0, [32, 16, 32], None)
    assert mine.io_voxels is None and mine.io_fine_steps == RECOMMENDED_REFINEMENT["io_fine_steps"]
    assert cli._refinement(mine).smoothness == 3.0


def test_ensemble_sets_the_recommended_ensemble_and_explicit_flags_win():
    args = _args("--ensemble")
    assert args.symmetric and args.flip_axes == RECOMMENDED_ENSEMBLE["flip_axes"]
    assert args.passes == RECOMMENDED_ENSEMBLE["passes"]
    assert _args("--ensemble", "--passes", "1", "--flip-axes", "1").passes == 1
    assert _args("--ensemble", "--flip-axes", "1").flip_axes == [1]
    assert args.flip_passes is None and _args("--ensemble", "--flip-passes", "1").flip_passes == 1


def test_refinement_arguments_half_grid_and_unknown_names():
    settings = refinement_arguments((3, 9), io_steps=None, io_lr=1e-3)
    assert "io_size" not in settings and settings["io_voxels"] == RECOMMENDED_REFINEMENT["io_voxels"]
    assert settings["io_steps"] == RECOMMENDED_REFINEMENT["io_steps"] and settings["io_lr"] == 1e-3
    symmetric = refinement_arguments((3, 9), SYMMETRIC_REFINEMENT)  # a preset on the model's grid
    assert symmetric["io_field_size"] == [2, 4] and symmetric["io_size"] == [3, 9]
    assert symmetric["io_mode"] == "residual" and symmetric["regularizer"] == "gradicon"
    with pytest.raises(ValueError, match="unknown refinement settings"):
        refinement_arguments((8, 8), io_stepz=3)


def test_a_refinement_value_gives_what_its_keywords_give_and_is_not_mixed_with_them(tmp_path):
    """``register_files(..., refinement=Refinement(...))`` is ``register_files(..., **refinement.arguments())``; a
    refinement given together with differing ``io_*`` keywords is refused."""
    import nibabel as nib
    import numpy as np
    import torch

    from monai_icon.apps import register_files
    from monai_icon.apps.presets import recommended_refinement
    from monai_icon.engines.instance_optimisation import Refinement
    from test_register_files import _shifted_balls_and_identity_model

    fixed, moving, model = _shifted_balls_and_identity_model(tmp_path, (12, 12, 6))
    refinement = Refinement(steps=3, lr=5e-3, mode="residual", size=(24, 24, 12), levels=2, field_size=(12, 12, 6),
                            fine_steps=1)
    warped = {}
    for name, kwargs in (("value", {"refinement": refinement}), ("keywords", refinement.arguments())):
        torch.manual_seed(0)
        summary = register_files(fixed, moving, model, warped=tmp_path / f"{name}.nii.gz", **kwargs)
        assert len(summary["io_losses"]) == 3
        warped[name] = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
    np.testing.assert_array_equal(warped["value"], warped["keywords"])
    with pytest.raises(ValueError, match="either as refinement= or as \\['io_steps'\\]"):
        register_files(fixed, moving, model, warped=tmp_path / "x.nii.gz", refinement=refinement, io_steps=5)
    recommended = recommended_refinement((64, 32, 64))
    assert recommended.arguments() == {**{k: v for k, v in RECOMMENDED_REFINEMENT.items() if k.startswith("io_")},
                                       "io_size": None, "io_field_size": None}
