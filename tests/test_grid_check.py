"""The network grid against the reoriented data: shapes and spacings from the header, and the warning."""

import warnings

import nibabel as nib
import numpy as np
import pytest

from monai_icon.transforms import check_network_grid, network_grid_spacing, reoriented_geometry


def _write(path, shape, affine):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), str(path))
    return path


def test_geometry_follows_the_reorientation_and_the_warning_names_the_stretched_grid(tmp_path):
    # stored like the ITK T1 head: array axes (L, S, A), 2 x 2 x 3 mm
    affine = np.array([[-2.0, 0, 0, 0], [0, 0, 3.0, -254], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    path = _write(tmp_path / "head.nii.gz", (16, 16, 8), affine)
    assert reoriented_geometry(path, None) == ((16, 16, 8), (2.0, 2.0, 3.0))
    assert reoriented_geometry(path, "RAS") == ((16, 8, 16), (2.0, 3.0, 2.0))
    assert network_grid_spacing(path, (16, 8, 16), "RAS") == (2.0, 3.0, 2.0)
    assert network_grid_spacing(path, (8, 8, 8), "RAS") == (4.0, 3.0, 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_network_grid(path, (16, 8, 16), "RAS") == (2.0, 3.0, 2.0)  # the reoriented order: quiet
        check_network_grid(path, (16, 16, 8), None)  # the file's order without reorientation: quiet too
        check_network_grid(path, (8, 4, 8), "RAS")  # pooled alike on every axis: quiet
    with pytest.warns(UserWarning, match=r"stretched 4\.0 times.*about \(16, 8, 16\)"):
        assert check_network_grid(path, (16, 16, 8), "RAS") == (2.0, 1.5, 4.0)  # the file's order after RAS


def test_grid_check_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        reoriented_geometry(tmp_path / "missing.nii.gz", "RAS")
    path = _write(tmp_path / "a.nii.gz", (4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match="axcodes"):
        reoriented_geometry(path, "RA")
    with pytest.raises(ValueError, match="spatial_size"):
        network_grid_spacing(path, (4, 4), "RAS")
