import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from conftest import FixedDisplacementNet, smooth_random_field
from monai_icon.networks import Affine, DisplacementField, Downsample, TwoStep
from monai_icon.networks.maps import (
    AffineMap,
    ComposedMap,
    DisplacementMap,
    IdentityMap,
    as_map,
    ddf_to_map_grid,
    identity_grid,
    interpolate,
    map_grid_to_ddf,
    resize_linear,
)
from monai_icon.networks.nets import AffineNet, UNet


def test_identity_grid_convention():
    grid = identity_grid((3, 5))
    assert grid.shape == (1, 2, 3, 5)
    assert torch.allclose(grid[0, 0, :, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(grid[0, 1, 0, :], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize("shape", [(10, 13), (6, 7, 5)])
def test_identity_block_gives_identity(shape):
    net = UNet(spatial_dims=len(shape))
    a, b = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    phi = DisplacementField(net)(a, b)
    assert torch.equal(phi.grid(shape), identity_grid(shape).expand(2, -1, *shape))
    assert torch.allclose(phi.warp(a), a, atol=1e-6)
    assert torch.count_nonzero(phi.ddf(shape)) == 0


@pytest.mark.parametrize("shape,shift", [((9, 12), (2, -3)), ((7, 6, 8), (1, 2, -2))])
def test_translation_moves_image_by_whole_voxels(shape, shift):
    image = torch.rand(1, 1, *shape)
    disp = torch.zeros(1, len(shape), *shape)
    for d, s in enumerate(shift):
        disp[:, d] = s / (shape[d] - 1)
    warped = DisplacementMap(disp).warp(image)
    # pull-back: warped[x] = image[x + shift] wherever x + shift is inside the image
    src = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, shape))
    dst = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(shift, shape))
    assert torch.allclose(warped[(..., *dst)], image[(..., *src)], atol=1e-5)


@pytest.mark.parametrize("shape", [(17, 11), (9, 14, 6)])
def test_ddf_conversion_matches_monai_warp(shape):
    image = torch.rand(2, 3, *shape)
    phi = DisplacementMap(smooth_random_field(2, shape, amplitude=0.1))
    ddf = phi.ddf(shape)
    ours = phi.warp(image)
    monai_warped = Warp(mode="bilinear", padding_mode="border")(image, ddf)
    assert torch.allclose(ours, monai_warped, atol=1e-5)
    assert torch.allclose(ddf_to_map_grid(ddf), phi.grid(shape), atol=1e-6)
    # the map rebuilt from the DDF is the same function on the grid
    assert torch.allclose(as_map(ddf).grid(shape), phi.grid(shape), atol=1e-6)


def test_one_voxel_shift_is_one_voxel_in_ddf():
    shape = (5, 5)
    disp = torch.zeros(1, 2, *shape)
    disp[:, 0] = 1 / (shape[0] - 1)
    ddf = map_grid_to_ddf(DisplacementMap(disp).grid(shape))
    assert torch.allclose(ddf[:, 0], torch.ones(1, *shape))
    assert torch.allclose(ddf[:, 1], torch.zeros(1, *shape))


def test_interpolate_accepts_any_point_layout():
    field = torch.rand(2, 1, 6, 7)
    points = torch.rand(2, 2, 5)  # a flat list of 5 points
    out = interpolate(field, points)
    assert out.shape == (2, 1, 5)
    grid_out = interpolate(field, points.reshape(2, 2, 5, 1))
    assert torch.allclose(out, grid_out[..., 0])
    with pytest.raises(ValueError, match="points must be"):
        interpolate(field, torch.rand(2, 3, 5))


@pytest.mark.parametrize("shape", [(12, 10), (6, 8, 7)])
def test_two_step_equals_explicit_composition(shape):
    a, b = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    first, second = DisplacementField(FixedDisplacementNet(0.08)), DisplacementField(FixedDisplacementNet(0.05))
    phi_two = TwoStep(first, second)(a, b)
    phi = first(a, b)
    psi = second(phi.warp(a), b)
    x = torch.rand(2, len(shape), 31)
    assert torch.allclose(phi_two(x), phi(psi(x)), atol=1e-6)
    # and it is not simply one of the two steps
    assert not torch.allclose(phi_two(x), phi(x), atol=1e-4)
    assert isinstance(phi_two, ComposedMap)


@pytest.mark.parametrize("shape", [(15, 10), (9, 7, 11)])
def test_downsample_runs_child_at_low_resolution_and_map_is_continuous(shape):
    net = FixedDisplacementNet(0.2)
    a, b = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    phi = Downsample(DisplacementField(net), factor=2)(a, b)
    coarse_shape = tuple((n + 1) // 2 for n in shape)
    assert net.calls[-1] == (1, 1, *coarse_shape)  # ceil mode
    fine = phi.grid(shape)
    assert fine.shape == (1, len(shape), *shape)
    coarse_disp = phi.displacement
    # linear interpolation of the coarse field: fine steps never jump more than the coarse ones
    for axis in range(len(shape)):
        fine_jump = (fine - identity_grid(shape)).diff(dim=axis + 2).abs().max()
        coarse_jump = coarse_disp.diff(dim=axis + 2).abs().max()
        assert fine_jump <= coarse_jump + 1e-6
    # evaluating at off-grid points is well defined and equals the child's map
    x = torch.rand(1, len(shape), 50)
    assert torch.allclose(phi(x), DisplacementMap(coarse_disp)(x))


@pytest.mark.parametrize("shape", [(15, 10), (9, 7, 11)])
def test_downsample_resample_is_the_composition_sampled_on_the_coarse_grid(shape):
    torch.manual_seed(0)
    coarse_shape = tuple((n + 1) // 2 for n in shape)
    fields = [smooth_random_field(1, coarse_shape, 0.05) for _ in range(2)]

    class Net(torch.nn.Module):
        def __init__(self, field):
            super().__init__()
            self.field = field

        def forward(self, a, b):
            return self.field

    def model(resample):
        steps = TwoStep(DisplacementField(Net(fields[0])), DisplacementField(Net(fields[1])))
        return Downsample(steps, factor=2, resample=resample)

    a, b = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    exact, resampled = model(False)(a, b), model(True)(a, b)
    assert isinstance(exact, ComposedMap) and isinstance(resampled, DisplacementMap)
    # the same map at the coarse grid points (where it was sampled) ...
    coarse = identity_grid(coarse_shape)
    assert torch.allclose(resampled(coarse), exact(coarse), atol=1e-6)
    # ... linear in between: on the fine grid, the coarse-grid composition interpolated, not the exact composition
    expected = F.interpolate(exact.grid(coarse_shape) - coarse, size=shape, mode="bilinear" if len(shape) == 2
                             else "trilinear", align_corners=True) + identity_grid(shape)
    assert torch.allclose(resampled.grid(shape), expected, atol=1e-6)
    assert not torch.allclose(resampled.grid(shape), exact.grid(shape), atol=1e-6)
    # gradients reach both steps' outputs through the resampled map
    for field in fields:
        field.requires_grad_(True)
    model(True)(a, b).grid(shape).square().sum().backward()
    assert all(field.grad is not None and field.grad.abs().sum() > 0 for field in fields)
    with pytest.raises(ValueError, match="resample must be True or False"):
        Downsample(DisplacementField(Net(fields[0])), resample="yes")


def test_affine_block_and_map():
    a = torch.rand(2, 1, 16, 12)
    phi = Affine(AffineNet(2))(a, a)
    assert torch.allclose(phi.grid((16, 12)), identity_grid((16, 12)).expand(2, -1, -1, -1))
    m = torch.tensor([[[1.1, 0.2, 0.05], [-0.1, 0.9, 0.1]]])
    x = torch.rand(1, 2, 7)
    expected = torch.einsum("ij,bjp->bip", m[0, :, :2], x) + m[0, :, 2:].unsqueeze(0)
    assert torch.allclose(AffineMap(m)(x), expected)


def test_identity_map_and_composition_operator():
    phi = DisplacementMap(smooth_random_field(2, (8, 9)))
    ident = IdentityMap(2, 2)
    x = torch.rand(2, 2, 8, 9)
    assert torch.allclose((phi @ ident)(x), phi(x))
    assert torch.allclose((ident @ phi)(x), phi(x))


def test_map_errors_name_the_problem():
    with pytest.raises(ValueError, match="displacement must be"):
        DisplacementMap(torch.zeros(1, 3, 4, 4))
    phi = DisplacementMap(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="points must be"):
        phi(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="batch size"):
        phi(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="3D grid"):
        DisplacementMap(torch.zeros(1, 3, 4, 4, 4)).grid((4, 4))
    with pytest.raises(ValueError, match="compose"):
        ComposedMap(phi, DisplacementMap(torch.zeros(1, 3, 4, 4, 4)))


def test_nested_blocks_validate_once_at_the_outermost_block(monkeypatch):
    import monai_icon.networks.blocks as blocks

    calls = []
    original = blocks.check_image_pair
    monkeypatch.setattr(blocks, "check_image_pair", lambda a, b, **k: calls.append(1) or original(a, b, **k))
    model = Downsample(TwoStep(DisplacementField(FixedDisplacementNet()), DisplacementField(FixedDisplacementNet())))
    a = torch.rand(1, 1, 10, 12)
    model(a, a)
    assert len(calls) == 1
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad, a)


def test_maps_keep_float32_coordinates_under_mixed_precision():
    """A network's output under autocast is float16 / bfloat16; maps must still compute coordinates in float32
    (a bfloat16 identity grid is off by up to 0.4 voxels at 128, which blurs every warp)."""
    from monai_icon.losses import ICONLoss
    from monai_icon.networks.nets import UNet

    a, b = torch.rand(2, 1, 128, 128), torch.rand(2, 1, 128, 128)
    block = DisplacementField(UNet(2))  # zero-initialised output: the identity map
    with torch.autocast("cpu", dtype=torch.bfloat16):
        phi_AB, phi_BA = block(a, b), block(b, a)
        assert phi_AB.dtype == torch.float32 and phi_AB.displacement.dtype == torch.float32
        assert torch.equal(phi_AB.grid((128, 128)), identity_grid((128, 128)).expand(2, -1, -1, -1))
        out = ICONLoss("mse", 2048.0)(a, b, phi_AB, phi_BA)
    torch.testing.assert_close(out.warped_A, a, atol=1e-4, rtol=0)  # identity up to float32 grid rounding
    expected = ((a - b) ** 2).mean(dim=(1, 2, 3)).mul(2).mean()
    torch.testing.assert_close(out.similarity, expected, atol=1e-5, rtol=0)
    half = DisplacementMap(torch.zeros(1, 3, 4, 5, 6, dtype=torch.float16))
    assert half.dtype == torch.float32
    assert DisplacementMap(torch.zeros(1, 2, 4, 5, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("setting", ["autocast", "matmul-precision"])
def test_affine_map_ignores_reduced_precision_settings(setting):
    from contextlib import ExitStack

    matrix = torch.tensor([[[0.9, 0.2, 0.05], [-0.15, 1.1, -0.02]]]).repeat(2, 1, 1)
    points = torch.rand(2, 2, 5000)
    expected = AffineMap(matrix)(points)
    torch.testing.assert_close(expected, torch.einsum("bij,bjp->bip", matrix.double()[:, :, :2], points.double())
                               .add(matrix.double()[:, :, 2:]).float())
    previous = torch.get_float32_matmul_precision()
    try:
        with ExitStack() as stack:
            if setting == "autocast":
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
                got = AffineMap(matrix.bfloat16())(points)  # an affine network's output under autocast
            else:
                torch.set_float32_matmul_precision("medium")
                got = AffineMap(matrix)(points)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert got.dtype == torch.float32
    # under autocast only the matrix has the network's precision; the points are mapped in float32 as without it
    assert torch.equal(got, AffineMap(matrix.bfloat16())(points) if setting == "autocast" else expected)


def test_precision_helpers():
    from monai_icon.precision import at_least_float32, autocast_disabled

    assert at_least_float32(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    same = torch.ones(2, dtype=torch.float64)
    assert at_least_float32(same) is same
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_disabled(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        with autocast_disabled("meta"):  # a device type autocast does not know: nothing to turn off
            pass


def test_sampled_map_is_exact_at_its_grid_points_and_linear_between():
    torch.manual_seed(0)
    phi = ComposedMap(DisplacementMap(smooth_random_field(2, (9, 8))), DisplacementMap(smooth_random_field(2, (5, 6))))
    sampled = phi.sampled((9, 8))
    assert isinstance(sampled, DisplacementMap)
    torch.testing.assert_close(sampled.grid((9, 8)), phi.grid((9, 8)))
    torch.testing.assert_close(phi.sampled((9, 8), identity_grid((9, 8))).displacement, sampled.displacement)
    x = torch.rand(2, 2, 40)
    torch.testing.assert_close(sampled(x), DisplacementMap(phi.grid((9, 8)) - identity_grid((9, 8)))(x))


@pytest.mark.parametrize(
    "shape,size",
    [((9,), (17,)), ((6, 7), (11, 3)), ((5, 4, 6), (9, 8, 13)), ((5, 1, 6), (2, 4, 1)), ((3, 4, 5), (3, 9, 5))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_linear_equals_interpolate_with_aligned_corners(shape, size, dtype):
    """The separable matrix products give F.interpolate(align_corners=True)'s values and gradients, up- and
    downsampling, with axes of size 1 on either side and axes left as they are."""
    torch.manual_seed(0)
    mode = ("linear", "bilinear", "trilinear")[len(shape) - 1]
    field = torch.randn(2, 3, *shape, dtype=dtype, requires_grad=True)
    weights = torch.randn(2, 3, *size, dtype=dtype)
    got = resize_linear(field, size)
    (grad,) = torch.autograd.grad((got * weights).sum(), field)
    expected = F.interpolate(field, size=size, mode=mode, align_corners=True)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), field)
    assert got.shape == (2, 3, *size) and got.dtype == dtype
    tol = 5e-6 if dtype == torch.float32 else 1e-12  # values of order 1: a few float32 roundings
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=tol * 10, rtol=0)
    assert resize_linear(field, shape) is field  # nothing to resize


def test_resize_linear_keeps_float32_under_reduced_precision_settings():
    field = torch.rand(1, 3, 5, 6, 7) * 0.1
    size = (17, 11, 13)
    expected = F.interpolate(field.double(), size=size, mode="trilinear", align_corners=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resize_linear(field, size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-7, rtol=0)  # bfloat16 products would be ~1e-4 off
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # products may then run in bfloat16: PyTorch's kernel instead
        got = resize_linear(field, size)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(got, F.interpolate(field, size=size, mode="trilinear", align_corners=True))
    holed = field.clone()
    holed[0, 1, 2, 3, 4] = float("nan")  # a product would spread it along whole rows; the kernel keeps it local
    got = resize_linear(holed, size)
    assert torch.equal(got.isnan(), F.interpolate(holed, size=size, mode="trilinear", align_corners=True).isnan())
    assert 0 < int(got.isnan().sum()) <= 6**3  # a neighbourhood (whole rows of the channel: over 2,000)
    half = field.bfloat16()  # half precision: PyTorch's kernel, in that precision
    assert torch.equal(resize_linear(half, size), F.interpolate(half, size=size, mode="trilinear", align_corners=True))


def test_resize_linear_errors_name_the_problem():
    with pytest.raises(ValueError, match="spatial axes"):
        resize_linear(torch.zeros(2, 3), (4,))
    with pytest.raises(ValueError, match="needs 3 sizes"):
        resize_linear(torch.zeros(1, 3, 4, 4, 4), (8, 8))
    with pytest.raises(ValueError, match="positive"):
        resize_linear(torch.zeros(1, 3, 4, 4, 4), (8, 0, 8))
