"""Synthetic knees, laterality harmonisation, the OAI preprocessing pipeline and knee datalists."""

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Compose, LoadImaged

from monai_icon.data import (
    KNEE_LABELS,
    build_knee_datalist,
    knee_affine,
    load_pair_datalist,
    random_knee_anatomy,
    render_knee,
    write_datalist,
    write_synthetic_knees,
)
from monai_icon.transforms import (
    HarmoniseLaterality,
    HarmoniseLateralityd,
    left_right_axis,
    oai_pair_transforms,
    oai_preprocessing,
    side_from_filename,
)

SHAPE, SPACING = (40, 36, 16), (3.0, 3.2, 7.0)


_WORLD_AXIS = {"R": "LR", "L": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
_SIZE, _SPACING = {"LR": 16, "AP": 40, "SI": 36}, {"LR": 7.0, "AP": 3.0, "SI": 3.2}


def _knee_pair_sides(axcodes, rotation=(0.0, 0.0, 0.0)):
    """The same anatomy as a LEFT and as a RIGHT knee (no noise, no deformation) on one grid whose array axes
    run along ``axcodes`` (same physical extent and spacing per world axis whatever the order)."""
    anatomy = replace(random_knee_anatomy("LEFT", seed=3, deformation_mm=0.0), noise=0.0)
    shape = tuple(_SIZE[_WORLD_AXIS[c]] for c in axcodes)
    affine = knee_affine(shape, [_SPACING[_WORLD_AXIS[c]] for c in axcodes], axcodes, rotation)
    left = render_knee(anatomy, shape, affine)
    right = render_knee(replace(anatomy, side="RIGHT"), shape, affine)
    return left, right, affine


def test_synthetic_knee_has_both_cartilages_and_is_reproducible():
    anatomy = random_knee_anatomy("RIGHT", seed=5)
    affine = knee_affine(SHAPE, SPACING)
    image, label = render_knee(anatomy, SHAPE, affine, seed=5)
    image2, label2 = render_knee(random_knee_anatomy("RIGHT", seed=5), SHAPE, affine, seed=5)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(label, label2)
    counts = np.bincount(label.ravel(), minlength=3)
    assert counts[KNEE_LABELS["femoral_cartilage"]] > 50 and counts[KNEE_LABELS["tibial_cartilage"]] > 20
    assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() < 1.2
    # cartilage is brighter than bone on average (DESS-like contrast)
    assert image[label > 0].mean() > image[(label == 0) & (image > 0.45)].mean()
    other = render_knee(random_knee_anatomy("RIGHT", seed=6), SHAPE, affine, seed=6)[1]
    assert (other != label).any()


def test_right_knee_is_the_mirror_image_of_the_left_one_in_world_space():
    (left, left_label), (right, right_label), _ = _knee_pair_sides("PIR")
    # the grid is centred on the world origin and axis 2 runs left-right: mirroring x flips axis 2
    np.testing.assert_array_equal(right_label, left_label[:, :, ::-1])
    np.testing.assert_allclose(right, left[:, :, ::-1], atol=1e-6)
    assert not np.array_equal(left_label, left_label[:, :, ::-1])  # a knee is not symmetric


@pytest.mark.parametrize(
    "affine,axis",
    [
        (knee_affine(SHAPE, SPACING, "PIR"), 2),
        (knee_affine(SHAPE, SPACING, "RAS"), 0),
        (knee_affine(SHAPE, SPACING, "SLA"), 1),
        (knee_affine(SHAPE, SPACING, "PIR", rotation_deg=(10.0, 25.0, 20.0)), 2),  # oblique
    ],
)
def test_left_right_axis_follows_the_orientation(affine, axis):
    assert left_right_axis(affine) == axis


def test_left_right_axis_rejects_ambiguous_and_singular_affines():
    with pytest.raises(ValueError, match="equally close"):
        left_right_axis(knee_affine(SHAPE, SPACING, "RAS", rotation_deg=(0.0, 0.0, 45.0)))
    with pytest.raises(ValueError, match="singular"):
        left_right_axis(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_side_from_filename():
    assert side_from_filename("/d/9000099_20040820_SAG_3D_DESS_LEFT_016610899905_image.nii.gz") == "LEFT"
    assert side_from_filename("knee-right.nii.gz") == "RIGHT"
    assert side_from_filename("bright_image.nii.gz") is None  # not a separate word
    assert side_from_filename("LEFT_and_RIGHT.nii") is None


@pytest.mark.parametrize("axcodes", ["PIR", "LSA"])
def test_harmonised_right_knee_equals_the_left_knee_whatever_the_array_order(axcodes):
    (left, left_label), (right, right_label), affine = _knee_pair_sides(axcodes)
    flip = HarmoniseLaterality(target_side="LEFT")
    out = flip(MetaTensor(torch.from_numpy(right)[None], affine=torch.from_numpy(affine)), "RIGHT")
    out_label = flip(MetaTensor(torch.from_numpy(right_label)[None], affine=torch.from_numpy(affine)), "R")
    np.testing.assert_allclose(out[0].numpy(), left, atol=1e-6)
    np.testing.assert_array_equal(out_label[0].numpy(), left_label)
    assert torch.equal(out.affine, torch.from_numpy(affine))  # mirrored in world space: same affine
    same = flip(MetaTensor(torch.from_numpy(left)[None], affine=torch.from_numpy(affine)), "LEFT")
    np.testing.assert_array_equal(same[0].numpy(), left)


def test_harmonise_laterality_dict_reads_the_side_from_file_names_and_inverts(tmp_path):
    (left, left_label), (right, right_label), affine = _knee_pair_sides("PIR")
    files = {}
    for key, array in (("image", right), ("label", right_label)):
        files[key] = str(tmp_path / f"9000001_SAG_3D_DESS_RIGHT_{key}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), files[key])
    xform = Compose([LoadImaged(["image", "label"], image_only=True, ensure_channel_first=True),
                     HarmoniseLateralityd(["image", "label"], target_side="LEFT")])
    out = xform(files)
    np.testing.assert_allclose(out["image"][0].numpy(), left, atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy().astype(np.uint8), left_label)
    back = xform.inverse(out)
    np.testing.assert_allclose(back["image"][0].numpy(), right, atol=1e-6)
    # an explicit side entry wins over the file name
    kept = xform({**files, "side": "LEFT"})
    np.testing.assert_allclose(kept["image"][0].numpy(), right, atol=1e-6)
    with pytest.raises(ValueError, match="cannot tell the knee side"):
        HarmoniseLateralityd(["image"])({"image": MetaTensor(torch.zeros(1, 4, 4, 4))})
    with pytest.raises(ValueError, match="unknown knee side"):
        HarmoniseLateralityd(["image"])({"image": MetaTensor(torch.zeros(1, 4, 4, 4)), "side": "up"})


def _write(tmp_path, name, array, affine):
    path = str(tmp_path / name)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_oai_preprocessing_normalises_percentiles_and_pools_exactly(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, size=(16, 12, 8)).astype(np.float32)
    label = rng.integers(0, 3, size=(16, 12, 8)).astype(np.uint8)
    affine = knee_affine((16, 12, 8), (1.0, 1.5, 2.0), "PIR")
    item = {
        "image": _write(tmp_path, "a_image.nii.gz", image, affine),
        "label": _write(tmp_path, "a_label.nii.gz", label, affine),
        "side": "LEFT",
    }
    # same grid: only the intensity normalisation acts
    out = Compose(oai_preprocessing(["image"], ["label"], spatial_size=(16, 12, 8)))(item)
    lo, hi = np.percentile(image, [1, 99])
    np.testing.assert_allclose(out["image"][0].numpy(), np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert out["label"].dtype == torch.int64
    np.testing.assert_array_equal(out["label"][0].numpy(), label)
    # half the size: images are 2x average pooled, labels take the nearest voxel centre
    out = Compose(oai_preprocessing(["image"], ["label"], spatial_size=(8, 6, 4), percentiles=None))(item)
    pooled = F.avg_pool3d(torch.from_numpy(image)[None, None], 2)[0, 0].numpy()
    np.testing.assert_allclose(out["image"][0].numpy(), pooled, rtol=1e-5)
    np.testing.assert_array_equal(out["label"][0].numpy(), label[1::2, 1::2, 1::2])
    # the affine follows: voxel (0, 0, 0) of the pooled grid is the centre of the first 2x2x2 block
    centre = affine @ np.array([0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(out["image"].affine.numpy() @ np.array([0, 0, 0, 1.0]), centre, atol=1e-6)


def test_oai_preprocessing_reorients_files_of_any_orientation_to_the_same_arrays(tmp_path):
    (left, left_label), _, affine = _knee_pair_sides("PIR")
    (left2, _), _, affine2 = _knee_pair_sides("LSA")  # the same knee stored in another array order
    a = _write(tmp_path, "x_LEFT_image.nii.gz", left, affine)
    b = _write(tmp_path, "y_LEFT_image.nii.gz", left2, affine2)
    xform = Compose(oai_preprocessing(["image"], spatial_size=SHAPE))
    np.testing.assert_allclose(xform({"image": a})["image"].numpy(), xform({"image": b})["image"].numpy(), atol=1e-5)


def test_synthetic_folder_datalist_and_pair_pipeline(tmp_path):
    records = write_synthetic_knees(tmp_path / "knees", num_subjects=6, shape=(32, 32, 12), spacing=(4.2, 4.2, 10.0))
    assert [r["side"] for r in records] == ["LEFT", "RIGHT"] * 3
    datalist = build_knee_datalist(tmp_path / "knees", test_fraction=0.3, num_test_pairs=4, relative_to=tmp_path)
    path = write_datalist(datalist, tmp_path / "datalist.json")
    train_subjects = {r["subject"] for r in datalist["training"]}
    test_subjects = {r["subject"] for r in datalist["test"]}
    assert len(train_subjects) == 4 and len(test_subjects) == 2 and not train_subjects & test_subjects
    assert all(not p["moving_image"].startswith("/") for p in datalist["test_pairs"])
    assert all(p["moving_image"].split("_")[0] != p["fixed_image"].split("_")[0] for p in datalist["test_pairs"])
    training = load_decathlon_datalist(str(path), True, "training")
    assert all(r["image"].startswith(str(tmp_path)) for r in training)
    pairs = load_pair_datalist(path, key="test_pairs")
    item = oai_pair_transforms(spatial_size=(16, 16, 8))(pairs[0])
    assert item["moving_image"].shape == item["fixed_label"].shape == (1, 16, 16, 8)
    assert float(item["moving_image"].max()) == 1.0 and float(item["fixed_image"].min()) == 0.0
    assert json.loads(path.read_text())["labels"]["1"] == "femoral_cartilage"


def test_datalist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_knee_datalist(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_knee_datalist(tmp_path / "empty")
    write_synthetic_knees(tmp_path / "one", num_subjects=1, shape=(8, 8, 4), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="two subjects"):
        build_knee_datalist(tmp_path / "one")
    _write(tmp_path / "one", "9000005_noside_image.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="no LEFT/RIGHT"):
        build_knee_datalist(tmp_path / "one")


def test_deformed_copies_of_the_embedded_t1_volume(tmp_path):
    from monai_icon.data import embedded_t1_head, write_deformed_copies

    image_path, label_path = embedded_t1_head()
    source, source_label = nib.load(image_path), nib.load(label_path)
    records = write_deformed_copies(tmp_path / "vols", num_copies=3, deformation_mm=6.0, seed=1)
    labels = [np.asarray(nib.load(r["label"]).dataobj) for r in records]
    original = np.asarray(source_label.dataobj)
    for r, lab in zip(records, labels):
        copy = nib.load(r["image"])
        np.testing.assert_allclose(copy.affine, source.affine)
        assert copy.shape == source.shape and set(np.unique(lab)) <= set(np.unique(original))
        # deformed, but still mostly the same anatomy: a fair share of voxels keeps its label
        agreement = (lab == original).mean()
        assert 0.5 < agreement < 0.999
    assert (labels[0] != labels[1]).any()
    datalist = build_knee_datalist(tmp_path / "vols", 0.34, num_test_pairs=1, require_side=False)
    assert "side" not in datalist["training"][0] and "moving_side" not in datalist["test_pairs"][0]
    with pytest.raises(ValueError, match="no LEFT/RIGHT"):
        build_knee_datalist(tmp_path / "vols")


def test_validation_split_takes_other_subjects_and_keeps_the_test_pairs(tmp_path):
    from monai_icon.data import validation_key, write_datalist, write_deformed_copies

    write_deformed_copies(tmp_path / "vols", num_copies=8, deformation_mm=6.0, seed=1)
    plain = build_knee_datalist(tmp_path / "vols", 0.34, num_test_pairs=2, require_side=False)
    split = build_knee_datalist(tmp_path / "vols", 0.34, num_test_pairs=2, require_side=False, val_fraction=0.4,
                                num_val_pairs=2)
    assert split["test_pairs"] == plain["test_pairs"] and split["test"] == plain["test"]
    subjects = {name: {r["subject"] for r in split[name]} for name in ("training", "validation", "test")}
    assert len(subjects["validation"]) == 2 and len(subjects["training"]) == 3 and len(subjects["test"]) == 3
    assert not (subjects["validation"] & subjects["training"]) and not (subjects["validation"] & subjects["test"])
    val_files = {r["image"] for r in split["validation"]}
    assert len(split["validation_pairs"]) == 2
    assert all({p["moving_image"], p["fixed_image"]} <= val_files for p in split["validation_pairs"])
    assert validation_key(write_datalist(split, tmp_path / "split.json")) == "validation_pairs"
    with pytest.warns(UserWarning, match="validating on its test pairs"):
        assert validation_key(write_datalist(plain, tmp_path / "plain.json")) == "test_pairs"
    with pytest.raises(ValueError, match="val_fraction"):
        build_knee_datalist(tmp_path / "vols", 0.34, require_side=False, val_fraction=1.0)


def test_deformed_copies_name_a_missing_or_non_image_source(tmp_path):
    from monai_icon.data import embedded_t1_head, write_deformed_copies

    _, label_path = embedded_t1_head()
    with pytest.raises(FileNotFoundError, match="volume not found"):
        write_deformed_copies(tmp_path / "out", 1, image=tmp_path / "missing.nii.gz", label=label_path)
    surface = tmp_path / "surface.gii"  # a file nibabel reads, but not an image volume
    nib.save(nib.gifti.GiftiImage(), str(surface))
    with pytest.raises(ValueError, match="surface.gii is not an image volume"):
        write_deformed_copies(tmp_path / "out", 1, image=surface, label=label_path)
