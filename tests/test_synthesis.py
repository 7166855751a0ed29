"""Images synthesised from label maps (RandLabelSynthesisd) and multi-scale deformations (RandBatchAugmentd)."""

import pytest
import torch

from monai_icon.engines.trainer import _reads_labels
from monai_icon.transforms import (
    RandBatchAugmentd,
    RandLabelSynthesisd,
    chain_batch_transforms,
    random_bias_field,
    random_shapes,
    synthesise_from_labels,
)


def _labels(batch=2, size=(12, 10, 8)):
    lab = torch.zeros(batch, 1, *size)
    lab[:, :, 3:9, 2:8, 2:6] = 1
    lab[:, :, 5:7, 4:6, 3:5] = 2
    return lab


def test_synthesise_from_labels_uses_the_table_and_rescales():
    lab = _labels(1)
    image = synthesise_from_labels(lab, torch.tensor([[0.2, 0.9, 0.5]]))
    assert image.shape == lab.shape and float(image.min()) == 0.0 and float(image.max()) == 1.0
    # background (0.2) -> 0, label 1 (0.9) -> 1, label 2 (0.5) -> (0.5 - 0.2) / 0.7
    assert torch.allclose(image[lab == 2], torch.tensor(0.3 / 0.7))
    assert torch.all(image[lab == 1] == 1) and torch.all(image[lab == 0] == 0)


def test_synthesise_from_labels_rejects_labels_without_intensity():
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        synthesise_from_labels(_labels(1), torch.tensor([[0.2, 0.9]]))
    with pytest.raises(ValueError, match=r"\[B, 1, \*spatial\]"):
        synthesise_from_labels(torch.zeros(1, 2, 4, 4, 4), torch.tensor([[0.2, 0.9]]))


def test_random_shapes_and_bias_field():
    g = torch.Generator().manual_seed(0)
    shapes = random_shapes(2, (16, 12, 8), num_labels=6, control_points=4, generator=g)
    assert shapes.shape == (2, 1, 16, 12, 8) and shapes.dtype == torch.int64
    assert 0 <= int(shapes.min()) and int(shapes.max()) <= 5 and len(shapes.unique()) > 2
    field = random_bias_field(3, (8, 8), 0.5, generator=g)
    assert field.shape == (3, 1, 8, 8) and float(field.min()) > 0
    assert torch.all(random_bias_field(2, (8, 8), 0.0, generator=g) == 1)
    with pytest.raises(ValueError, match="bias strength"):
        random_bias_field(1, (8, 8), float("nan"))


def _batch():
    lab = _labels()
    image = lab / 2
    return {"moving_image": image.clone(), "fixed_image": image.clone(), "moving_label": lab.clone(),
            "fixed_label": lab.clone()}


def test_synthesis_shared_table_gives_identical_images_for_identical_labels():
    out = RandLabelSynthesisd(prob=1.0, noise=0.0, bias=0.0, seed=1)(_batch())
    # same labels, same table, no noise/bias: the pair's images are equal; the labels are removed by default
    assert "moving_label" not in out and "fixed_label" not in out
    blurred = [out[k] for k in ("moving_image", "fixed_image")]
    assert blurred[0].shape == (2, 1, 12, 10, 8)
    # each side is blurred or not independently: compare on voxels whose neighbourhood holds one label
    for voxel in ((0, 0, 0), (4, 3, 3)):
        assert torch.allclose(blurred[0][(..., *voxel)], blurred[1][(..., *voxel)], atol=1e-5)
    assert not torch.allclose(out["moving_image"], _batch()["moving_image"])


def test_synthesis_off_keeps_images_and_shapes_replace_labels():
    batch = _batch()
    same = RandLabelSynthesisd(prob=0.0, bias=0.0, keep_labels=True)(batch)
    assert torch.equal(same["moving_image"], batch["moving_image"])
    assert torch.equal(same["moving_label"], batch["moving_label"])
    shaped = RandLabelSynthesisd(prob=0.0, shapes_prob=1.0, num_shapes=5, shape_points=3, bias=0.0,
                                 keep_labels=True)(batch)
    assert torch.equal(shaped["moving_label"], shaped["fixed_label"])
    assert not torch.equal(shaped["moving_label"], batch["moving_label"])
    assert int(shaped["moving_label"].max()) <= 4


def test_synthesis_errors_name_the_problem():
    batch = _batch()
    del batch["fixed_label"]
    with pytest.raises(KeyError, match="fixed_label"):
        RandLabelSynthesisd()(batch)
    bad = _batch()
    bad["moving_label"] = bad["moving_label"] * float("nan")
    with pytest.raises(ValueError, match="finite integer labels"):
        RandLabelSynthesisd()(bad)
    with pytest.raises(ValueError, match="prob must be in"):
        RandLabelSynthesisd(prob=1.5)


def test_trainer_keeps_labels_for_an_augmentation_that_reads_them():
    spatial = RandBatchAugmentd(["moving_image", "fixed_image"])
    assert not _reads_labels(spatial)
    assert _reads_labels(RandLabelSynthesisd())
    assert _reads_labels(chain_batch_transforms(RandLabelSynthesisd(), spatial))


def test_multiscale_random_deformation():
    image = torch.rand(2, 1, 16, 16, 16)
    batch = {"moving_image": image, "fixed_image": image.clone()}
    kwargs = dict(rotate_degrees=0.0, scale=0.0, translate=0.0, deform=2.0)
    one = RandBatchAugmentd(["moving_image", "fixed_image"], deform_points=5, seed=3)
    listed = RandBatchAugmentd(["moving_image", "fixed_image"], deform_points=[5], seed=3)
    # a one-element list is the single lattice (same draws)
    one.rotate_degrees = listed.rotate_degrees = 0.0
    for t in (one, listed):
        t.scale, t.translate, t.deform = kwargs["scale"], kwargs["translate"], kwargs["deform"]
    assert torch.equal(one(batch)["moving_image"], listed(batch)["moving_image"])
    multi = RandBatchAugmentd(["moving_image", "fixed_image"], deform=2.0, deform_points=[3, 6], deform_random=True,
                              rotate_degrees=0.0, scale=0.0, translate=0.0)
    field = multi._displacement(4, (16, 16, 16), torch.device("cpu"))
    assert field is not None and field.shape == (4, 16, 16, 16, 3)
    with pytest.raises(ValueError, match="control_points"):
        RandBatchAugmentd(["moving_image"], deform=1.0, deform_points=[4, 1])
    with pytest.raises(ValueError, match="at least one lattice"):
        RandBatchAugmentd(["moving_image"], deform=1.0, deform_points=[])
