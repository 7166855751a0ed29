"""Registering image files in physical space: spacing/orientation/size handling, ITK outputs, the CLI."""

import json
from dataclasses import replace

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT
from monai_icon.apps import RegistrationModel, load_registration_model, register_files, save_registration_model
from monai_icon.apps.cli import main
from monai_icon.data import knee_affine, random_knee_anatomy, render_knee
from monai_icon.networks import Affine, AffineMap, RegistrationModule, RegistrationNet, multistep_registration
from monai_icon.networks.nets import AffineNet

ANATOMY = replace(random_knee_anatomy("LEFT", seed=2, deformation_mm=0.0), noise=0.0)
FIXED_SHAPE, FIXED_AFFINE = (40, 36, 16), knee_affine((40, 36, 16), (3.0, 3.2, 7.0), "PIR", (8.0, 5.0, 12.0))
MOVING_SHAPE, MOVING_AFFINE = (36, 40, 20), knee_affine((36, 40, 20), (3.3, 3.0, 6.0), "ASR")
SHIFT = np.array([4.0, -6.0, 5.0])  # mm (RAS): the moving knee is the fixed one moved by SHIFT


class ConstantAffine(RegistrationModule):
    """A stand-in registration block returning a known affine map in network coordinates."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = torch.as_tensor(matrix, dtype=torch.float32)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def compute_map(self, image_A, image_B):
        return AffineMap(self.matrix.expand(image_A.shape[0], *self.matrix.shape) + 0 * self.dummy)


def _save(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def knee_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phys")
    fixed, fixed_label = render_knee(ANATOMY, FIXED_SHAPE, FIXED_AFFINE)
    shifted = MOVING_AFFINE.copy()
    shifted[:3, 3] -= SHIFT  # sample the knee at y - SHIFT: content moved by +SHIFT
    moving, moving_label = render_knee(ANATOMY, MOVING_SHAPE, shifted)
    return {
        "folder": folder,
        "fixed": _save(folder / "fixed.nii.gz", fixed, FIXED_AFFINE),
        "fixed_label": _save(folder / "fixed_label.nii.gz", fixed_label, FIXED_AFFINE),
        "moving": _save(folder / "moving.nii.gz", moving, MOVING_AFFINE),
        "moving_label": _save(folder / "moving_label.nii.gz", moving_label, MOVING_AFFINE),
    }


@pytest.fixture(scope="module")
def translation_run(knee_files):
    """Instance optimisation of an affine model on an oblique, anisotropic pair with different grids."""
    torch.manual_seed(0)
    network = RegistrationNet(Affine(AffineNet(spatial_dims=3, channels=(8, 16, 32))))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    model = RegistrationModel(network, (32, 32, 16), axcodes="PIR", similarity="mse", lmbda=1.0)
    out = {k: str(knee_files["folder"] / f"{k}{ext}") for k, ext in
           (("warped", ".nii.gz"), ("ddf", ".nii.gz"), ("transform", ".h5"), ("warped_label", ".nii.gz"))}
    summary = register_files(knee_files["fixed"], knee_files["moving"], model, moving_label=knee_files["moving_label"],
                             io_steps=200, io_lr=2e-3, **out)
    return {"summary": summary, "before": before, "network": network, **out}


def test_translation_is_recovered_in_millimetres(translation_run):
    ddf = nib.load(translation_run["ddf"])
    assert ddf.shape == (*FIXED_SHAPE, 1, 3)
    np.testing.assert_allclose(ddf.affine, FIXED_AFFINE, atol=1e-4)
    lps = ddf.get_fdata()[..., 0, :]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    # near the knee's centre (within 30 mm of the world origin) the displacement is the shift, to < 1.5 mm
    centres = (
        np.einsum(
            "ij,...j->...i",
            FIXED_AFFINE[:3, :3],
            np.stack(np.meshgrid(*[np.arange(n) for n in FIXED_SHAPE], indexing="ij"), -1),
        )
        + FIXED_AFFINE[:3, 3]
    )
    central = np.linalg.norm(centres, axis=-1) < 30.0
    recovered = np.median(ras[central], axis=0)
    assert np.abs(recovered - SHIFT).max() < 1.5, recovered
    losses = translation_run["summary"]["io_losses"]
    assert losses[-1] < 0.5 * losses[0]


def test_instance_optimisation_restores_the_weights(translation_run):
    after = translation_run["network"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in translation_run["before"].items())


def test_itk_transform_and_nifti_ddf_reproduce_the_torch_warp(knee_files, translation_run):
    fixed, moving = itk.imread(knee_files["fixed"], itk.F), itk.imread(knee_files["moving"], itk.F)
    ours = itk.array_from_image(itk.imread(translation_run["warped"], itk.F))
    transform = itk.transformread(translation_run["transform"])[0]
    assert transform.GetNameOfClass() == "DisplacementFieldTransform"
    resampled = itk.resample_image_filter(moving, transform=transform, use_reference_image=True,
                                          reference_image=fixed, default_pixel_value=0.0)
    np.testing.assert_allclose(itk.array_from_image(resampled), ours, atol=1e-4)
    # the NIfTI displacement field, read back and applied by ITK as a displacement-field transform
    field = itk.imread(translation_run["ddf"], itk.Vector[itk.F, 3])
    vectors = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    vectors.CopyInformation(field)
    from_ddf = itk.DisplacementFieldTransform[itk.D, 3].New()
    from_ddf.SetDisplacementField(vectors)
    resampled = itk.resample_image_filter(moving, transform=from_ddf, use_reference_image=True,
                                          reference_image=fixed, default_pixel_value=0.0)
    np.testing.assert_allclose(itk.array_from_image(resampled), ours, atol=1e-4)
    # the registration brought the moving knee onto the fixed one
    fixed_array = itk.array_from_image(fixed)
    unregistered = itk.array_from_image(
        itk.resample_image_filter(moving, use_reference_image=True, reference_image=fixed)
    )
    assert np.mean((ours - fixed_array) ** 2) < 0.5 * np.mean((unregistered - fixed_array) ** 2)
    labels = nib.load(translation_run["warped_label"])
    assert labels.shape == FIXED_SHAPE and set(np.unique(labels.get_fdata())) <= {0.0, 1.0, 2.0}


def _identity_model(matrix=None, **kwargs):
    matrix = torch.eye(3, 4) if matrix is None else matrix
    return RegistrationModel(RegistrationNet(ConstantAffine(matrix)), (24, 24, 12), percentiles=None, **kwargs)


def test_known_network_map_gives_the_expected_world_transform(knee_files, tmp_path):
    """A map shifting by t (network units) of an image onto itself is the world shift U t (U: [0,1] -> mm)."""
    t = torch.tensor([0.05, -0.1, 0.02])
    matrix = torch.cat([torch.eye(3), t[:, None]], 1)
    model = _identity_model(matrix, axcodes="PIR")
    summary = register_files(knee_files["fixed"], knee_files["fixed"], model, ddf=tmp_path / "d.nii.gz",
                             moving_label=knee_files["fixed_label"], warped_label=tmp_path / "l.nii.gz")
    # network grid: the fixed image reoriented to PIR (already PIR) and resized; its [0,1] box spans the
    # same physical extent as the file's voxels (edge to edge) so U maps t to L * (N / S) * (S - 1) t
    linear = FIXED_AFFINE[:3, :3] * (np.array(FIXED_SHAPE) / np.array([24, 24, 12]))
    expected = linear @ (t.double().numpy() * (np.array([24, 24, 12]) - 1))
    np.testing.assert_allclose(summary["mean_displacement_mm"], expected, atol=1e-3)
    identity = register_files(knee_files["fixed"], knee_files["fixed"], _identity_model(), warped=tmp_path / "w.nii.gz",
                              moving_label=knee_files["fixed_label"], warped_label=tmp_path / "l0.nii.gz")
    np.testing.assert_allclose(identity["mean_displacement_mm"], 0.0, atol=1e-6)
    np.testing.assert_allclose(
        nib.load(tmp_path / "w.nii.gz").get_fdata(), nib.load(knee_files["fixed"]).get_fdata(), atol=1e-5
    )
    np.testing.assert_array_equal(
        nib.load(tmp_path / "l0.nii.gz").get_fdata(), nib.load(knee_files["fixed_label"]).get_fdata()
    )


def test_mirrored_sides_keep_the_physical_transform_consistent(knee_files, tmp_path):
    """With an identity network map, mirroring only the moving image yields the physical mirror; mirroring both
    gives back the identity."""
    model = _identity_model(target_side="LEFT")
    both = register_files(knee_files["fixed"], knee_files["fixed"], model, warped=tmp_path / "both.nii.gz",
                          fixed_side="RIGHT", moving_side="RIGHT")
    np.testing.assert_allclose(both["mean_displacement_mm"], 0.0, atol=1e-6)
    affine = knee_affine((20, 18, 10), (3.0, 3.0, 6.0), "PIR")  # axis-aligned: the mirror is an array flip
    image = render_knee(ANATOMY, (20, 18, 10), affine)[0]
    path = _save(tmp_path / "aligned.nii.gz", image, affine)
    register_files(path, path, _identity_model(target_side="LEFT"), warped=tmp_path / "mirror.nii.gz",
                   fixed_side="LEFT", moving_side="RIGHT")
    np.testing.assert_allclose(nib.load(tmp_path / "mirror.nii.gz").get_fdata(), image[:, :, ::-1], atol=1e-5)


def test_model_file_and_bundle_folder_round_trip(tmp_path):
    kwargs = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
    network = multistep_registration(**kwargs)
    torch.nn.init.normal_(network.block.block.net.out.weight, std=0.01)
    path = save_registration_model(
        tmp_path / "m.pt",
        network,
        {"_target_": "monai_icon.networks.multistep_registration", **kwargs},
        spatial_size=(16, 16, 8),
        axcodes="PIR",
        target_side="LEFT",
        lmbda=2.0,
    )
    model = load_registration_model(path)
    assert model.spatial_size == (16, 16, 8) and model.target_side == "LEFT" and model.lmbda == 2.0
    assert not model.network.training
    for k, v in network.state_dict().items():
        assert torch.equal(model.network.state_dict()[k], v)
    # on CPU a 3D model's convolution weights are channels-last (faster oneDNN convolutions), with the same maps
    conv_weights = [m.weight for m in model.network.modules() if isinstance(m, torch.nn.Conv3d)]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights)
    standard = load_registration_model(path, channels_last=False)
    assert all(m.weight.is_contiguous() for m in standard.network.modules() if isinstance(m, torch.nn.Conv3d))
    images = torch.rand(2, 1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.network(*images)[0].grid((16, 16, 8)),
                                   standard.network(*images)[0].grid((16, 16, 8)), atol=1e-6, rtol=0)
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(
        json.dumps(
            {
                "network_def": {"_target_": "monai_icon.networks.multistep_registration", **kwargs},
                "spatial_size": [16, 16, 8],
            }
        )
    )
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    assert load_registration_model(bundle).spatial_size == (16, 16, 8)
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        load_registration_model(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_registration_model(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a monai-icon model file"):
        load_registration_model(tmp_path / "plain.pt")


def test_cli_end_to_end_and_its_errors(knee_files, tmp_path, capsys):
    kwargs = {"coarse_steps": 1, "fine_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
    model = save_registration_model(tmp_path / "m.pt", multistep_registration(**kwargs),
                                    {"_target_": "monai_icon.networks.multistep_registration", **kwargs},
                                    spatial_size=(16, 16, 8), axcodes="PIR")
    args = [
        "register",
        "--fixed",
        knee_files["fixed"],
        "--moving",
        knee_files["moving"],
        "--model",
        str(model),
        "--warped",
        str(tmp_path / "w.nii.gz"),
        "--ddf",
        str(tmp_path / "d.nii.gz"),
        "--transform",
        str(tmp_path / "t.h5"),
        "--moving-label",
        knee_files["moving_label"],
        "--warped-label",
        str(tmp_path / "l.nii.gz"),
        "--io-steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["io_losses"]) == 2 and set(summary["written"]) == {"warped", "ddf", "transform", "warped_label"}
    assert nib.load(tmp_path / "w.nii.gz").shape == FIXED_SHAPE
    assert not list(tmp_path.glob("*.partial*"))

    def error(replacements):
        argv = list(args)
        for flag, value in replacements.items():
            argv[argv.index(flag) + 1] = value
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "moving image not found" in error({"--moving": str(tmp_path / "nope.nii.gz")})
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    assert "cannot read the fixed image" in error({"--fixed": str(tmp_path / "bad.nii.gz")})
    assert "model not found" in error({"--model": str(tmp_path / "none.pt")})
    flat = _save(tmp_path / "flat.nii.gz", np.zeros((10, 12), np.float32), np.eye(4))
    assert "differ in dimension" in error({"--moving": flat})
    nan = _save(tmp_path / "nan.nii.gz", np.full((6, 6, 6), np.nan, np.float32), np.eye(4))
    assert "NaN" in error({"--moving": nan})
    with pytest.raises(MemoryError, match="GiB"):
        register_files(
            knee_files["fixed"],
            knee_files["moving"],
            load_registration_model(model),
            warped=tmp_path / "x.nii.gz",
            memory_limit_bytes=1000,
        )


def test_cli_builds_synthetic_knees_and_a_datalist(tmp_path, capsys):
    assert (
        main(["synthetic-knees", str(tmp_path / "k"), "--subjects", "4", "--shape", "16,16,8", "--spacing", "8,8,15"])
        == 0
    )
    assert main(["datalist", str(tmp_path / "k"), "--output", str(tmp_path / "dl.json"), "--test-pairs", "2",
                 "--test-fraction", "0.5"]) == 0
    datalist = json.loads((tmp_path / "dl.json").read_text())
    assert len(datalist["training"]) == 2 and len(datalist["test_pairs"]) == 2
    assert main(["datalist", str(tmp_path / "missing"), "--output", str(tmp_path / "x.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_array_order_does_not_matter_with_a_canonical_orientation(tmp_path):
    """The same head volume stored two ways (RAS array order, and LPS with permuted axes: the same world image)
    registers to the same world transform when the model brings inputs to one canonical orientation
    (axcodes="RAS", what the T1-head demo's models now store); with axcodes=None the network sees a different
    array and the result changes."""
    from monai_icon.data import write_deformed_copies

    records = write_deformed_copies(tmp_path / "vols", num_copies=2, deformation_mm=6.0, seed=3)
    torch.manual_seed(0)
    tiny = {"coarse_steps": 1, "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
    network = multistep_registration(**tiny)
    torch.nn.init.normal_(network.block.block.net.out.weight, std=0.02)

    def restore(path, perm):  # the stored-another-way array and affine
        img = nib.load(path)
        data, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine.copy()
        data = np.flip(np.flip(data, 0), 1)  # RAS -> LPS: reverse the first two axes...
        affine = affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, -1, 0, data.shape[1] - 1], [0, 0, 1, 0],
                                    [0, 0, 0, 1]], dtype=np.float64)
        data = np.ascontiguousarray(data.transpose(perm))  # ...and permute the axes
        affine = affine[:, [*perm, 3]]
        return _save(tmp_path / f"{perm}_{path.split('/')[-1]}", data, affine)

    results = {}
    for axcodes in ("RAS", None):
        model = RegistrationModel(network, (32, 32, 16), axcodes=axcodes)
        for perm in ((0, 1, 2), (2, 0, 1)):
            fixed, moving = (records[0]["image"], records[1]["image"]) if perm == (0, 1, 2) else \
                (restore(records[0]["image"], perm), restore(records[1]["image"], perm))
            summary = register_files(fixed, moving, model, ddf=str(tmp_path / f"ddf_{axcodes}_{perm}.nii.gz"))
            results[axcodes, perm] = np.array(summary["mean_displacement_mm"])
    np.testing.assert_allclose(results["RAS", (0, 1, 2)], results["RAS", (2, 0, 1)], atol=1e-3)
    assert np.abs(results[None, (0, 1, 2)] - results[None, (2, 0, 1)]).max() > 1e-2


def test_register_pairs_names_outputs_per_pair_and_refuses_path_ids(knee_files, tmp_path):
    from monai_icon.apps import pair_outputs, register_pairs

    model = RegistrationModel(RegistrationNet(ConstantAffine(torch.eye(3, 4))), (16, 16, 8), axcodes="PIR")
    pairs = [{"moving_image": knee_files["moving"], "fixed_image": knee_files["fixed"], "pair_id": "a"},
             {"moving_image": knee_files["moving"], "fixed_image": knee_files["fixed"],
              "moving_label": knee_files["moving_label"]}]
    summaries = register_pairs(pairs, model, tmp_path / "out")
    assert [s["pair_id"] for s in summaries] == ["a", "pair001"]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(["a_warped.nii.gz", "a_ddf.nii.gz", "a_phi.h5", "pair001_warped.nii.gz",
                            "pair001_ddf.nii.gz", "pair001_phi.h5", "pair001_warped_label.nii.gz"])
    with pytest.raises(ValueError, match="plain file name"):
        pair_outputs({"pair_id": "../escape"}, 0, tmp_path)


def test_warp_command_reproduces_the_registration_outputs(knee_files, translation_run, tmp_path, capsys):
    """monai-icon warp applies the written .h5 (or the LPS-mm displacement image) to the moving image and labels:
    the same warped image and labels as monai-icon register wrote, on the fixed grid."""
    ours = nib.load(translation_run["warped"]).get_fdata()
    for transform in (translation_run["transform"], translation_run["ddf"]):
        out = tmp_path / f"w_{transform.split('/')[-1].split('.')[0]}.nii.gz"
        assert main(["warp", "--moving", knee_files["moving"], "--transform", transform, "--output", str(out)]) == 0
        np.testing.assert_allclose(nib.load(out).get_fdata(), ours, atol=1e-4)
    out = tmp_path / "wl.nii.gz"
    assert main(["warp", "--moving", knee_files["moving_label"], "--transform", translation_run["transform"],
                 "--output", str(out), "--mode", "label"]) == 0
    expected = nib.load(translation_run["warped_label"]).get_fdata()
    assert (nib.load(out).get_fdata() == expected).mean() > 0.999
    # another reference grid: the moving image's own (its grid, the transform interpolated there)
    out = tmp_path / "w_ref.nii.gz"
    assert main(["warp", "--moving", knee_files["moving"], "--transform", translation_run["transform"],
                 "--output", str(out), "--reference", knee_files["moving"]]) == 0
    assert nib.load(out).shape == MOVING_SHAPE
    capsys.readouterr()
    assert main(["warp", "--moving", knee_files["moving"], "--transform", knee_files["fixed"],
                 "--output", str(tmp_path / "x.nii.gz")]) == 2
    assert "is not a 3D displacement field" in capsys.readouterr().err


def test_jacobian_command_matches_count_folds_on_the_same_map(tmp_path, capsys):
    """A displacement field with a known fold: the physical-space determinant's sign agrees with count_folds on
    the same map (the metric's stencil), an affine stretch gives its determinant everywhere."""
    from monai_icon.apps.physical import write_displacement, world_points
    from monai_icon.apps.transform_files import jacobian_file, read_displacement
    from monai_icon.metrics import count_folds

    shape, affine = (8, 9, 7), knee_affine((8, 9, 7), (2.0, 1.5, 3.0), "LPS")
    y = world_points(affine, shape)
    stretch = 0.2 * (y - y.mean(dim=(1, 2, 3), keepdim=True))  # y -> 1.2 y: det 1.728
    write_displacement(stretch, affine, tmp_path / "s.nii.gz", tmp_path / "s.h5")
    for name in ("s.nii.gz", "s.h5"):
        summary = jacobian_file(tmp_path / name, tmp_path / f"j_{name.split('.')[1]}.nii.gz")
        assert summary["folds"] == 0 and summary["min"] == pytest.approx(1.728, rel=1e-4)
        assert summary["max"] == pytest.approx(1.728, rel=1e-4)
    disp, _ = read_displacement(tmp_path / "s.h5")
    torch.testing.assert_close(disp, stretch, atol=1e-6, rtol=0)
    fold = torch.zeros(3, *shape, dtype=torch.float64)
    fold[0, 4, 4, 3] = 3.5 * np.linalg.norm(affine[:3, 0])  # one point passes its neighbour along axis 0
    write_displacement(fold, affine, tmp_path / "f.nii.gz")
    summary = jacobian_file(tmp_path / "f.nii.gz")
    index_grid = torch.linalg.solve(torch.as_tensor(affine[:3, :3]), (y + fold - torch.as_tensor(affine[:3, 3])
                                                                      .reshape(3, 1, 1, 1)).reshape(3, -1))
    expected = int(count_folds(index_grid.reshape(1, 3, *shape)).item())
    assert summary["folds"] == expected > 0
    assert main(["jacobian", "--transform", str(tmp_path / "f.nii.gz"), "--output", str(tmp_path / "lj.nii.gz"),
                 "--log"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["folds"] == expected
    logdet = nib.load(tmp_path / "lj.nii.gz").get_fdata()
    assert logdet.shape == tuple(s - 1 for s in shape) and np.isnan(logdet).sum() == expected


def test_residual_instance_optimisation_on_a_finer_grid_than_the_network(knee_files, tmp_path):
    """An identity network on a 16x16x8 grid cannot register the shifted knee; residual instance optimisation on a
    32x32x16 grid of the same field of view (the network's maps apply there unchanged) does, and the network's
    weights are untouched."""
    network = multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    model = RegistrationModel(network, (16, 16, 8), axcodes="PIR", similarity="mse", lmbda=1.0)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    fixed = nib.load(knee_files["fixed"]).get_fdata()
    errors = {}
    fine = {"io_steps": 150, "io_lr": 4e-3, "io_mode": "residual", "io_size": (32, 32, 16)}
    for name, kwargs in (("none", {}), ("fine", fine)):
        torch.manual_seed(0)
        out = tmp_path / f"{name}.nii.gz"
        register_files(knee_files["fixed"], knee_files["moving"], model, warped=out, **kwargs)
        errors[name] = float(np.mean((nib.load(out).get_fdata() - fixed) ** 2))
    assert errors["fine"] < 0.7 * errors["none"], errors
    for k, v in network.state_dict().items():
        assert torch.equal(before[k], v), k
    with pytest.raises(ValueError, match="io_size"):
        register_files(knee_files["fixed"], knee_files["moving"], model, warped=tmp_path / "x.nii.gz", io_steps=1,
                       io_size=(32, 32, 16))


def test_masks_in_register_files_and_the_atlas(knee_files, tmp_path):
    """All-ones masks change nothing; a mask that hides the knee changes the input the network sees; masks must
    come in pairs and on the images' grids; AtlasSegmentation takes an atlas mask."""
    from monai_icon.apps import AtlasSegmentation
    from monai_icon.losses import ICONLoss

    network = multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    torch.nn.init.normal_(network.block.block.net.out.weight, std=0.02)
    model = RegistrationModel(network, (16, 16, 8), axcodes="PIR")
    ones = {}
    for key in ("fixed", "moving"):
        image = nib.load(knee_files[key])
        ones[key] = _save(tmp_path / f"{key}_ones.nii.gz", np.ones(image.shape, np.uint8), image.affine)
    half = nib.load(knee_files["fixed"])
    half_mask = np.ones(half.shape, np.uint8)
    half_mask[: half.shape[0] // 2] = 0
    half_path = _save(tmp_path / "half.nii.gz", half_mask, half.affine)
    plain = register_files(knee_files["fixed"], knee_files["moving"], model, ddf=str(tmp_path / "a.nii.gz"))
    same = register_files(knee_files["fixed"], knee_files["moving"], model, ddf=str(tmp_path / "b.nii.gz"),
                          fixed_mask=ones["fixed"], moving_mask=ones["moving"])
    other = register_files(knee_files["fixed"], knee_files["moving"], model, ddf=str(tmp_path / "c.nii.gz"),
                           fixed_mask=half_path, moving_mask=ones["moving"])
    np.testing.assert_allclose(same["mean_displacement_mm"], plain["mean_displacement_mm"], atol=1e-6)
    assert np.abs(np.subtract(other["mean_displacement_mm"], plain["mean_displacement_mm"])).max() > 1e-4
    with pytest.raises(ValueError, match="both masks"):
        register_files(knee_files["fixed"], knee_files["moving"], model, ddf=str(tmp_path / "d.nii.gz"),
                       fixed_mask=ones["fixed"])
    with pytest.raises(ValueError, match="mask's grid"):
        register_files(knee_files["fixed"], knee_files["moving"], model, ddf=str(tmp_path / "d.nii.gz"),
                       fixed_mask=ones["moving"], moving_mask=ones["moving"])
    label = torch.zeros(1, 16, 16, 8, dtype=torch.long)
    label[:, 4:8] = 1
    atlas = AtlasSegmentation(network, torch.rand(1, 16, 16, 8), label, atlas_mask=torch.ones(1, 16, 16, 8),
                              io_steps=1, io_lr=1e-3, loss=ICONLoss("mse", 1.0, spatial_dims=3))
    assert atlas(torch.rand(1, 1, 16, 16, 8)).shape == (1, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="atlas mask"):
        AtlasSegmentation(network, torch.rand(1, 16, 16, 8), label, atlas_mask=torch.ones(1, 8, 8, 8))


@pytest.mark.parametrize("suffix", [".png", ".nii.gz", ".mha"])
def test_2d_files_register_with_the_2d_bundle_and_its_itk_transform(tmp_path, suffix, capsys):
    """monai-icon register on 2D files (PNG, 2D NIfTI, MHA) with the 2D bundle's network: outputs on the fixed
    grid, and ITK applying the written 2D .h5 transform gives the same warped image."""
    import shutil

    from PIL import Image

    from monai_icon.data import load_mnist_fives
    from monai_icon.networks import unet_registration

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    shutil.copytree(ROOT / "bundle" / "mnist_icon" / "configs", bundle / "configs")
    torch.manual_seed(0)
    network = unet_registration(2, steps=2)  # the bundle's network: two U-Nets composed
    torch.nn.init.normal_(network.block.first.net.out.weight, std=0.02)
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    images = (load_mnist_fives()[[0, 7]] * 255).round().astype(np.uint8)
    paths = []
    for i, array in enumerate(images):
        path = tmp_path / f"img{i}{suffix}"
        if suffix == ".png":
            Image.fromarray(array).save(path)
        elif suffix == ".nii.gz":
            nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([0.8, 0.8, 1.0, 1.0])), str(path))
        else:
            itk.imwrite(itk.image_from_array(array.astype(np.float32)), str(path))
        paths.append(str(path))
    names = (("warped", ".nii.gz"), ("ddf", ".nii.gz"), ("transform", ".h5"))
    out = {k: str(tmp_path / f"{k}{ext}") for k, ext in names}
    code = main(["register", "--fixed", paths[0], "--moving", paths[1], "--model", str(bundle),
                 *[a for k, v in out.items() for a in (f"--{k}", v)]])
    assert code == 0, capsys.readouterr().err
    warped = itk.imread(out["warped"], itk.F)
    moving, fixed = itk.imread(paths[1], itk.F), itk.imread(paths[0], itk.F)
    assert itk.size(warped) == itk.size(fixed)
    transform = itk.transformread(out["transform"])[0]
    resampled = itk.resample_image_filter(moving, transform=transform, use_reference_image=True,
                                          reference_image=fixed, default_pixel_value=0.0)
    ours = itk.array_from_image(warped)
    np.testing.assert_allclose(itk.array_from_image(resampled), ours, atol=1e-2 * ours.max())
    assert np.abs(itk.array_from_image(itk.imread(out["ddf"]))).max() > 0.05  # a real, non-identity map


def test_label_supervised_instance_optimisation(tmp_path, capsys):
    """--label-weight adds the Dice term of the warped moving labels against the fixed labels to instance
    optimisation. Blank images (no image signal): without the term nothing moves; with it the moving ball is
    brought onto the fixed one."""
    shape, affine = (24, 24, 12), np.diag([2.0, 2.0, 3.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))

    def ball(centre):
        return (((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2 * np.reshape([1, 1, 2.25], (3, 1, 1, 1))).sum(0)
                < 36).astype(np.uint8)

    blank = np.zeros(shape, np.float32)
    files = {"image": _save(tmp_path / "blank.nii.gz", blank, affine),
             "fixed_label": _save(tmp_path / "fl.nii.gz", ball((12, 12, 6)), affine),
             "moving_label": _save(tmp_path / "ml.nii.gz", ball((9, 14, 6)), affine)}
    network = multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    model = RegistrationModel(network, (16, 16, 8), percentiles=None, similarity="mse", lmbda=1.0)
    fixed = nib.load(files["fixed_label"]).get_fdata()

    def dice(path):
        warped = nib.load(path).get_fdata()
        return 2 * ((warped == 1) & (fixed == 1)).sum() / ((warped == 1).sum() + (fixed == 1).sum())

    scores = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"wl{weight}.nii.gz"
        register_files(files["image"], files["image"], model, moving_label=files["moving_label"], warped_label=out,
                       io_steps=100, io_lr=5e-3, io_mode="residual", io_size=shape,
                       fixed_label=files["fixed_label"] if weight else None, label_weight=weight)
        scores[weight] = dice(out)
    assert scores[1.0] > scores[0.0] + 0.15, scores
    assert main(["register", "--fixed", files["image"], "--moving", files["image"], "--model",
                 str(save_registration_model(tmp_path / "m.pt", network,
                                             {"_target_": "monai_icon.networks.multistep_registration",
                                              "coarse_steps": 1, "encoder_channels": [4, 8],
                                              "decoder_channels": [8, 4]}, spatial_size=(16, 16, 8))),
                 "--warped", str(tmp_path / "w.nii.gz"), "--label-weight", "1"]) == 2
    assert "label_weight > 0 needs fixed_label" in capsys.readouterr().err


def _shifted_balls_and_identity_model(tmp_path, spatial_size):
    """Two 24x24x12 files of a soft ball shifted by two voxels, and a model file of a tiny identity network on
    ``spatial_size`` (no intensity normalisation)."""
    shape, affine = (24, 24, 12), np.diag([2.0, 2.0, 3.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)

    def ball(centre):
        r = np.sqrt(((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2 * np.reshape([1, 1, 2.25], (3, 1, 1, 1))).sum(0))
        return 1.0 / (1.0 + np.exp(r - 6.0))

    fixed = _save(tmp_path / "f.nii.gz", ball((12, 12, 6)), affine)
    moving = _save(tmp_path / "m.nii.gz", ball((10, 13, 6)), affine)
    spec = {"_target_": "monai_icon.networks.multistep_registration", "coarse_steps": 1,
            "encoder_channels": [4, 8], "decoder_channels": [8, 4]}
    network = multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    return fixed, moving, save_registration_model(tmp_path / "m.pt", network, spec, spatial_size=spatial_size,
                                                  percentiles=None)


def test_coarse_to_fine_residual_from_the_cli_with_an_instance_optimisation_loss_of_ones_choice(tmp_path, capsys):
    """``--io-levels`` (residual mode) with the similarity and lambda of instance optimisation chosen on the command
    line: a two-voxel shift of a ball is recovered better than without instance optimisation, and the summary
    reports the folds of the final map."""
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (24, 24, 12))
    errors = {}
    for steps in (0, 60):
        out = tmp_path / f"w{steps}.nii.gz"
        args = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model_file),
                "--warped", str(out), "--similarity", "lncc", "--lmbda", "2", "--regularizer", "gradicon"]
        if steps:
            args += ["--io-steps", str(steps), "--io-mode", "residual", "--io-levels", "3", "--io-lr", "5e-3"]
        assert main(args) == 0
        summary = json.loads(capsys.readouterr().out)
        assert 0.0 <= summary["folds_percent"] <= 100.0
        assert len(summary["io_losses"]) == steps
        errors[steps] = float(((nib.load(out).get_fdata() - nib.load(fixed).get_fdata()) ** 2).mean())
    assert errors[60] < 0.5 * errors[0], errors


def test_register_pairs_cli_scores_labelled_pairs_before_and_after(tmp_path, capsys):
    """``monai-icon register-pairs`` on the test pairs of a ``monai-icon datalist``: outputs per pair, label Dice on
    the fixed grid before/after (an identity model reproduces the unregistered Dice; coarse-to-fine residual
    instance optimisation improves it), folds, seconds, and a summary.json; bad arguments exit 2 with one line."""
    from conftest import labelled_pairs_and_tiny_model

    datalist, model = labelled_pairs_and_tiny_model(tmp_path, 2, (32, 32, 16))
    means = {}
    for name, extra in (("plain", []), ("io", ["--io-steps", "30", "--io-mode", "residual", "--io-levels", "3",
                                               "--io-lr", "3e-3", "--similarity", "lncc", "--regularizer",
                                               "gradicon", "--lmbda", "2"])):
        out = tmp_path / name
        assert main(["register-pairs", "--datalist", str(datalist), "--key", "test_pairs", "--model", str(model),
                     "--output-dir", str(out), *extra]) == 0
        assert "mean label Dice" in capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["mean"]["pairs"] == 2 and summary["mean"]["scored_pairs"] == 2
        for pair in summary["pairs"]:
            assert set(pair["dice"]) == set(pair["dice_unregistered"]) and pair["dice"]
            assert (out / f"{pair['pair_id']}_warped_label.nii.gz").is_file()
        means[name] = summary["mean"]
    assert means["plain"]["mean_dice"] == pytest.approx(means["plain"]["mean_dice_unregistered"], abs=1e-6)
    assert means["io"]["mean_dice"] > means["io"]["mean_dice_unregistered"] + 0.02, means
    assert main(["register-pairs", "--datalist", str(datalist), "--key", "nope", "--model", str(model),
                 "--output-dir", str(tmp_path / "x")]) == 2
    assert "must hold a non-empty list of pairs" in capsys.readouterr().err


def test_register_pairs_cli_test_time_ensemble(tmp_path, capsys):
    """``--symmetric --flip-axes 0 --passes 2`` (with ``--flip-passes 1``: mirrored in the first pass only) run the
    network as a test-time ensemble applied twice: on a model whose maps are identities the ensemble is the identity
    too (the unregistered Dice, no folds), and flip axes that the model's grid does not have exit 2 with one line
    naming them."""
    from conftest import labelled_pairs_and_tiny_model

    datalist, model = labelled_pairs_and_tiny_model(tmp_path, 2, (32, 32, 16))
    out = tmp_path / "ensemble"
    for extra in ([], ["--flip-passes", "1"]):
        assert main(["register-pairs", "--datalist", str(datalist), "--key", "test_pairs", "--model", str(model),
                     "--output-dir", str(out), "--symmetric", "--flip-axes", "0", "--passes", "2", *extra]) == 0
        capsys.readouterr()
        mean = json.loads((out / "summary.json").read_text())["mean"]
        assert mean["mean_dice"] == pytest.approx(mean["mean_dice_unregistered"], abs=1e-6)
        assert mean["folds_percent"] == 0.0
    assert main(["register-pairs", "--datalist", str(datalist), "--key", "test_pairs", "--model", str(model),
                 "--output-dir", str(out), "--flip-axes", "3"]) == 2
    assert "--flip-axes [3]" in capsys.readouterr().err
    assert main(["register-pairs", "--datalist", str(datalist), "--key", "test_pairs", "--model", str(model),
                 "--output-dir", str(out), "--passes", "0"]) == 2
    assert "passes" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [[], ["--compiled-lncc"], ["--fast-sampler", "--compiled-lncc"]])
def test_register_pairs_cli_enters_the_compiled_contexts_it_is_asked_for(tmp_path, capsys, monkeypatch, flags):
    """``--fast-sampler`` and ``--compiled-lncc`` hold for the whole loop over pairs, and only when given."""
    from conftest import labelled_pairs_and_tiny_model

    import monai_icon.apps.batch as register_module  # the CLI's register_pairs
    import monai_icon.losses.compiled_lncc as compiled_lncc
    from monai_icon.networks import trilinear

    datalist, model = labelled_pairs_and_tiny_model(tmp_path, 1, (16, 16, 8))
    seen = []
    original = register_module.register_pairs

    def recording(*args, **kwargs):
        seen.append((trilinear._state["enabled"], compiled_lncc._state["enabled"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(register_module, "register_pairs", recording)
    assert main(["register-pairs", "--datalist", str(datalist), "--key", "test_pairs", "--model", str(model),
                 "--output-dir", str(tmp_path / "out"), *flags]) == 0
    capsys.readouterr()
    assert seen == [("--fast-sampler" in flags, "--compiled-lncc" in flags)]
    assert not trilinear._state["enabled"] and not compiled_lncc._state["enabled"]


def test_instance_optimisation_compares_finer_images_than_its_fields(knee_files, tmp_path):
    """``io_field_size`` keeps the residual fields (and the regulariser's points) on the network grid while the
    images are compared on the finer ``io_size``: it registers the shifted knee like fields on the finer grid, its
    folds are counted on the field grid, and with ``io_fine_steps`` only the last steps compare the finer images."""
    network = multistep_registration(coarse_steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    model = RegistrationModel(network, (16, 16, 8), axcodes="PIR", similarity="mse", lmbda=1.0)
    fixed = nib.load(knee_files["fixed"]).get_fdata()
    errors = {}
    base = {"io_steps": 150, "io_lr": 4e-3, "io_mode": "residual", "io_levels": 2}
    fine = {**base, "io_size": (32, 32, 16), "io_field_size": (16, 16, 8)}
    settings = {"none": {}, "coarse": base, "fine_images": fine, "fine_last": {**fine, "io_fine_steps": 50}}
    for name, kwargs in settings.items():
        torch.manual_seed(0)
        out = tmp_path / f"{name}.nii.gz"
        summary = register_files(knee_files["fixed"], knee_files["moving"], model, warped=out, **kwargs)
        errors[name] = float(np.mean((nib.load(out).get_fdata() - fixed) ** 2))
        assert 0 <= summary["folds_percent"] <= 100
    assert errors["fine_images"] < 0.7 * errors["none"], errors
    assert errors["fine_last"] < 0.7 * errors["none"], errors
    assert errors["fine_images"] != errors["coarse"]  # the finer images were compared
    with pytest.raises(ValueError, match="io_field_size"):
        register_files(knee_files["fixed"], knee_files["moving"], model, warped=tmp_path / "x.nii.gz", io_steps=1,
                       io_field_size=(16, 16, 8))  # io_mode network
    with pytest.raises(ValueError, match="io_field_size"):
        register_files(knee_files["fixed"], knee_files["moving"], model, warped=tmp_path / "x.nii.gz", io_steps=1,
                       io_mode="residual", io_field_size=(16, 16))


def test_cli_fine_similarity_on_coarse_fields_and_the_lncc_window(tmp_path, capsys):
    """``--io-size`` with ``--io-field-size`` (and ``--io-fine-steps``) and ``--lncc-kernel`` from the command line:
    a shifted ball is recovered better than without instance optimisation, the summary counts folds on the field
    grid, a different LNCC window gives a different result, and bad windows or a non-LNCC similarity are refused."""
    fixed, moving, model_file = _shifted_balls_and_identity_model(tmp_path, (12, 12, 6))
    base = ["register", "--fixed", str(fixed), "--moving", str(moving), "--model", str(model_file),
            "--similarity", "lncc", "--lmbda", "2", "--regularizer", "gradicon"]
    fine = ["--io-steps", "60", "--io-mode", "residual", "--io-levels", "3", "--io-lr", "5e-3",
            "--io-size", "24,24,12", "--io-field-size", "12,12,6", "--io-fine-steps", "30"]
    errors = {}
    for name, extra in (("none", []), ("fine", fine), ("fine_k3", fine + ["--lncc-kernel", "3"])):
        out = tmp_path / f"{name}.nii.gz"
        torch.manual_seed(0)
        assert main(base + ["--warped", str(out)] + extra) == 0
        summary = json.loads(capsys.readouterr().out)
        assert 0.0 <= summary["folds_percent"] <= 100.0
        errors[name] = float(((nib.load(out).get_fdata() - nib.load(fixed).get_fdata()) ** 2).mean())
    assert errors["fine"] < 0.5 * errors["none"], errors
    assert errors["fine_k3"] != errors["fine"]
    for bad in (["--lncc-kernel", "4"], ["--lncc-kernel", "1"], ["--similarity", "mse", "--lncc-kernel", "5"]):
        assert main(base + ["--warped", str(tmp_path / "x.nii.gz")] + fine + bad) == 2
        assert "lncc" in capsys.readouterr().err


def test_register_with_refine_runs_the_refinement(knee_files, tmp_path, capsys):
    kwargs = {"coarse_steps": 1, "fine_steps": 0, "coarse_factor": 2, "encoder_channels": [4, 8],
              "decoder_channels": [8, 4]}
    model = save_registration_model(tmp_path / "m.pt", multistep_registration(**kwargs),
                                    {"_target_": "monai_icon.networks.multistep_registration", **kwargs},
                                    spatial_size=(16, 16, 8), axcodes="PIR")
    argv = ["register", "--fixed", knee_files["fixed"], "--moving", knee_files["moving"], "--model", str(model),
            "--warped", str(tmp_path / "w.nii.gz"), "--refine", "--ensemble", "--io-steps", "4",
            "--io-fine-steps", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (tmp_path / "w.nii.gz").is_file()
    assert len(summary["io_losses"]) == 4  # the explicit --io-steps, inside the refinement's other settings
