import pytest
import torch

from conftest import smooth_random_field
from monai_icon.metrics import FoldsMetric, count_folds, jacobian_determinant, threshold_dice
from monai_icon.networks.maps import DisplacementMap, identity_grid, map_grid_to_ddf


@pytest.mark.parametrize("shape", [(9, 12), (6, 7, 8)])
def test_no_folds_for_identity_and_smooth_maps(shape):
    ident = identity_grid(shape)
    assert count_folds(ident).item() == 0
    assert (jacobian_determinant(ident) > 0).all()
    smooth = DisplacementMap(smooth_random_field(3, shape, amplitude=0.02)).grid(shape)
    assert count_folds(smooth).sum().item() == 0


@pytest.mark.parametrize("shape", [(9, 12), (6, 7, 8)])
def test_mirror_folds_every_cell_and_double_mirror_none(shape):
    grid = identity_grid(shape).clone()
    cells = torch.tensor(shape).sub(1).prod().item()
    mirrored = grid.clone()
    mirrored[:, 0] = 1 - mirrored[:, 0]
    assert count_folds(mirrored).item() == cells
    assert count_folds(mirrored, percentage=True).item() == pytest.approx(100.0)
    both = mirrored.clone()
    both[:, 1] = 1 - both[:, 1]  # two reflections preserve orientation
    assert count_folds(both).item() == 0


def test_single_displaced_point_folds_exactly_one_cell():
    """Point (4, 5) moved 1.5 voxels back along axis 0 passes its neighbour (3, 5). With forward differences
    the cell with corner (3, 5) gets du = (-0.5 h0, 0), dv = (0, h1): det < 0. The cell with corner (4, 5) gets
    du = (2.5 h0, 0), dv = (1.5 h0, h1): det > 0; the cell with corner (4, 4) gets du = (h0, 0),
    dv = (-1.5 h0, h1): det > 0. So exactly one fold."""
    shape = (9, 10)
    grid = identity_grid(shape).clone()
    grid[0, 0, 4, 5] -= 1.5 / (shape[0] - 1)
    det = jacobian_determinant(grid)[0]
    assert count_folds(grid).item() == 1
    assert det[3, 5] < 0


def test_3d_single_point_fold():
    """Point (2, 3, 4) moved 1.5 voxels back along axis 2 passes its neighbour (2, 3, 3): with the reference's
    far-corner stencil only the cell whose far corner is that point folds (c = -0.5 h2)."""
    shape = (5, 6, 7)
    grid = identity_grid(shape).clone()
    grid[0, 2, 2, 3, 4] -= 1.5 / (shape[2] - 1)
    assert count_folds(grid).item() == 1
    assert jacobian_determinant(grid)[0, 1, 2, 3] < 0


def test_3d_folds_use_the_reference_far_corner_stencil():
    """Point (1, 1, 1) of a 4^3 grid moved by +1.5 voxels on every axis. The reference anchors the three
    differences at each cell's far corner: the cells whose far corners are (2, 1, 1), (1, 2, 1) and (1, 1, 2)
    get a = phi(2, 1, 1) - phi(1, 1, 1) = (-0.5, -1.5, -1.5) with b, c unchanged, det = -0.5 < 0 (3 folds),
    while the cell whose far corner is the point itself is (2.5, 1.5, 1.5) / (1.5, 2.5, 1.5) / (1.5, 1.5, 2.5),
    det > 0. A near-corner stencil counts 1 fold here (only the cell whose first corner is the point)."""
    grid = identity_grid((4, 4, 4)).clone() * 3  # voxel units
    grid[0, :, 1, 1, 1] += 1.5
    det = jacobian_determinant(grid)[0]
    assert count_folds(grid).item() == 3
    assert det[1, 0, 0] == pytest.approx(-0.5) and det[0, 1, 0] == pytest.approx(-0.5)
    assert det[0, 0, 1] == pytest.approx(-0.5) and det[0, 0, 0] > 0
    corner = grid[:, :, :-1, :-1, :-1]
    a, b, c = (grid[:, :, 1:, :-1, :-1] - corner, grid[:, :, :-1, 1:, :-1] - corner, grid[:, :, :-1, :-1, 1:] - corner)
    near_corner = (torch.linalg.cross(a, b, dim=1) * c).sum(dim=1)
    assert int((near_corner < 0).sum()) == 1  # the stencils disagree on this map


def test_3d_determinant_equals_the_matrix_determinant_of_the_far_corner_differences():
    """The written-out triple product equals det([a, b, c]) of the far-corner differences for a random map."""
    torch.manual_seed(0)
    grid = identity_grid((5, 6, 7)).repeat(2, 1, 1, 1, 1) + 0.1 * torch.randn(2, 3, 5, 6, 7)
    far = grid[:, :, 1:, 1:, 1:]
    a, b, c = far - grid[:, :, :-1, 1:, 1:], far - grid[:, :, 1:, :-1, 1:], far - grid[:, :, 1:, 1:, :-1]
    matrix = torch.stack([a, b, c], dim=-1).movedim(1, -2)  # [B, *cells, 3 (component), 3 (difference)]
    expected = torch.linalg.det(matrix.double()).float()
    assert torch.allclose(jacobian_determinant(grid), expected, atol=1e-6)
    assert bool((expected < 0).any()) and bool((expected > 0).any())  # both signs occur: a real check


def test_folds_metric_accumulates_ddfs():
    shape = (8, 9)
    mirrored = identity_grid(shape).clone()
    mirrored[:, 1] = 1 - mirrored[:, 1]
    ddf_folded = map_grid_to_ddf(mirrored)
    ddf_ok = torch.zeros(1, 2, *shape)
    metric = FoldsMetric()
    per_image = metric(y_pred=torch.cat([ddf_folded, ddf_ok]))
    assert per_image.shape == (2, 1) and per_image[0, 0] == 7 * 8 and per_image[1, 0] == 0
    metric(y_pred=[ddf_ok[0]])  # decollated batch
    assert metric.aggregate().item() == pytest.approx(56 / 3)
    pct = FoldsMetric(percentage=True, input_type="map")
    pct(y_pred=mirrored)
    assert pct.aggregate().item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="input_type"):
        FoldsMetric(input_type="jacobian")


def test_threshold_dice():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.zeros(2, 1, 4, 4)
    a[0, 0, :2] = 1.0  # 8 pixels
    b[0, 0, 1:3] = 1.0  # 8 pixels, 4 shared
    dice = threshold_dice(a, b)
    assert dice[0].item() == pytest.approx(0.5)
    assert dice[1].item() == pytest.approx(1.0)  # both empty
    with pytest.raises(ValueError, match="same shape"):
        threshold_dice(a, b[:, :, :3])
