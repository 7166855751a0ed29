"""The generalisation benchmark's own pieces: its deformation generator, label pooling and summary table."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import generalisation3d as g  # noqa: E402


def test_random_svf_transform_is_smooth_invertible_and_in_range():
    shape, spacing = (24, 20, 16), np.array([2.0, 2.0, 2.0])
    points = g.random_svf_transform(shape, spacing, torch.Generator().manual_seed(0), rotate_degrees=0.0,
                                    scale=0.0, shift_mm=0.0)
    assert points.shape == (*shape, 3)
    identity = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    displacement_mm = ((points - identity) * torch.as_tensor(spacing)).norm(dim=-1)
    # scaled so that the velocity's largest magnitude is 2-8 mm; its integral stays of that order
    assert 1.0 < float(displacement_mm.max()) < 12.0
    # a diffeomorphism sampled on the grid: positive Jacobian determinant everywhere
    grads = [torch.diff(points, dim=axis)[tuple(slice(0, n - 1) for n in shape)] for axis in range(3)]
    det = torch.linalg.det(torch.stack(grads, -1))
    assert float(det.min()) > 0
    # another seed, another transform; the affine part moves the volume
    other = g.random_svf_transform(shape, spacing, torch.Generator().manual_seed(1))
    assert not torch.allclose(points, other)


def test_deform_keeps_labels_integral_and_pooling_takes_the_majority():
    image = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    label = np.zeros((12, 10, 8), dtype=np.int16)
    label[2:9, 3:8, 2:6] = 7
    identity = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (12, 10, 8)],
                                          indexing="ij"), -1)
    warped, warped_label = g.deform(image, label, identity)
    assert np.allclose(warped, image, atol=1e-6) and np.array_equal(warped_label, label)
    labels = np.zeros((4, 4, 4), dtype=np.int64)
    labels[:2, :2, :2] = 3
    labels[0, 0, 0] = 5
    pooled = g._pool_labels(labels, 2)
    assert pooled.shape == (2, 2, 2) and pooled[0, 0, 0] == 3 and pooled[1, 1, 1] == 0
    largest = g._largest_labels(np.array([0, 4, 4, 4, 9, 9, 2]), 2)
    assert largest.tolist() == [0, 1, 1, 1, 2, 2, 0]


def test_summary_gives_each_method_its_share_of_syns_gain():
    rows = {"unregistered": {"pairs": 2, "mean_dice": 0.5, "seconds_per_pair": 0.0},
            "network": {"pairs": 2, "mean_dice": 0.6, "seconds_per_pair": 0.1, "folds_percent": 0.0},
            "syn": {"pairs": 2, "mean_dice": 0.9, "seconds_per_pair": 4.0}}
    table = g.summarise({"rows": rows})
    assert "| network | 2 | 0.600 | 25 % | 0.10 | 0.0000 |" in table
    assert "| syn | 2 | 0.900 | 100 % | 4.00 |  |" in table


def test_prepare_names_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nilearn wheel"):
        g.load_subjects(tmp_path / "missing.whl", tmp_path)
    (tmp_path / "n.whl").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="ch2.nii.gz"):
        g.load_subjects(tmp_path / "n.whl", tmp_path)


def test_run_takes_every_method_on_a_pair_before_the_next_pair(tmp_path, monkeypatch):
    """Methods interleaved pair by pair (each meets the same machine state), each model loaded once, one results
    row per method with every pair."""
    import shutil

    import syn_vs_icon
    from conftest import labelled_pairs_and_tiny_model

    datalist, model = labelled_pairs_and_tiny_model(tmp_path, 2, (16, 16, 8))
    shutil.copy(datalist, tmp_path / "datalist.json")
    calls = []
    run_icon = syn_vs_icon.run_icon

    def recording(pair, icon_model, refinement, work):
        calls.append((refinement.steps > 0, pair["fixed_image"]))
        return run_icon(pair, icon_model, refinement, work)

    monkeypatch.setattr(syn_vs_icon, "run_icon", recording)
    results = g.run(tmp_path, "test", str(model), tmp_path / "out", methods=("network", "refine"), threads=1)
    assert [refined for refined, _ in calls] == [False, True, False, True]
    assert calls[0][1] == calls[1][1] != calls[2][1] == calls[3][1]
    assert {k: v["pairs"] for k, v in results["rows"].items()} == {"unregistered": 2, "network": 2, "refine": 2}
    assert (tmp_path / "out" / "table.md").is_file()
