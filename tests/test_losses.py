import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from conftest import smooth_random_field
from monai_icon.losses import (
    GradientInverseConsistencyLoss,
    ICONLoss,
    InverseConsistencyLoss,
    gradient_inverse_consistency,
    icon_loss,
    inverse_consistency,
)
from monai_icon.networks import DisplacementField
from monai_icon.networks.maps import AffineMap, DisplacementMap, IdentityMap
from monai_icon.networks.nets import UNet


def _affine_pair(dims):
    linear = torch.eye(dims) + 0.1 * torch.randn(dims, dims)
    shift = 0.05 * torch.randn(dims, 1)
    forward = torch.cat([linear, shift], 1)
    inv = torch.linalg.inv(linear)
    backward = torch.cat([inv, -inv @ shift], 1)
    return AffineMap(forward[None]), AffineMap(backward[None])


@pytest.mark.parametrize("shape", [(12, 9), (6, 7, 5)])
def test_losses_vanish_for_identity_and_exact_inverse(shape):
    dims = len(shape)
    ident = IdentityMap(2, dims)
    zero = DisplacementMap(torch.zeros(2, dims, *shape))
    assert inverse_consistency(ident, zero, shape).abs().max() == 0
    assert gradient_inverse_consistency(zero, zero, shape).abs().max() == 0
    phi, phi_inv = _affine_pair(dims)
    assert inverse_consistency(phi, phi_inv, shape).max() < 1e-10
    assert gradient_inverse_consistency(phi, phi_inv, shape).max() < 1e-6


def test_pixel_swap_is_invisible_on_grid_and_penalised_off_grid():
    """Paper Fig. 3/4: two neighbouring pixels swap; the swap composed with itself is the identity on grid points."""
    shape = (8, 8)
    disp = torch.zeros(1, 2, *shape)
    disp[0, 1, 3, 3] = 1 / (shape[1] - 1)
    disp[0, 1, 3, 4] = -1 / (shape[1] - 1)
    swap = DisplacementMap(disp)
    on_grid = inverse_consistency(swap, swap, shape, sigma=0.0)
    off_grid = torch.stack([inverse_consistency(swap, swap, shape, sigma=1.0) for _ in range(20)]).mean()
    assert on_grid.abs().max() < 1e-12
    assert off_grid > 1e-5


def test_inverse_consistency_of_translations_matches_hand_computation():
    shape = (10, 11)
    a, b = torch.tensor([0.03, -0.02]), torch.tensor([0.01, 0.05])
    phi_AB = DisplacementMap(a.reshape(1, 2, 1, 1).expand(1, 2, *shape).clone())
    phi_BA = DisplacementMap(b.reshape(1, 2, 1, 1).expand(1, 2, *shape).clone())
    # e_AB = e_BA = a + b everywhere (constant fields extrapolate exactly); mean over the two channels.
    expected = 2 * ((a + b) ** 2).mean()
    assert torch.allclose(inverse_consistency(phi_AB, phi_BA, shape), expected.reshape(1), rtol=1e-5)
    assert torch.allclose(InverseConsistencyLoss()(phi_AB, phi_BA, shape), expected, rtol=1e-5)


def test_gradicon_of_affine_maps_matches_hand_computation():
    m_ab = torch.tensor([[[1.2, 0.1, 0.0], [0.0, 0.9, 0.1]]])
    m_ba = torch.tensor([[[1.0, 0.0, 0.05], [0.2, 1.0, 0.0]]])
    j = m_ab[0, :, :2] @ m_ba[0, :, :2] - torch.eye(2)
    expected = (j**2).sum() / 2  # sum over directions, mean over the two components
    value = GradientInverseConsistencyLoss()(AffineMap(m_ab), AffineMap(m_ba), (9, 9))
    assert torch.allclose(value, expected, rtol=1e-3)


def test_approximate_inverse_consistency_noise_level():
    shape = (64, 48)
    ident = DisplacementMap(torch.zeros(4, 2, *shape))
    eps = 0.5  # voxels
    value = inverse_consistency(ident, ident, shape, sigma=1.0, epsilon=eps).mean()
    voxel = torch.tensor([1 / 63, 1 / 47])
    # z - x = eps * (n1 + n2) per axis: variance 2 eps_d^2 per channel, two directions
    expected = 2 * (2 * (eps * voxel) ** 2).mean()
    assert abs(value.item() / expected.item() - 1) < 0.05


def test_losses_accept_voxel_ddfs():
    shape = (9, 10)
    ddf_ab = torch.zeros(1, 2, *shape)
    ddf_ab[:, 0] = 1.0  # one voxel along axis 0
    ddf_ba = -ddf_ab
    assert inverse_consistency(ddf_ab, ddf_ba).abs().max() < 1e-10
    expected = 2 * ((2 / 8) ** 2) / 2  # (1 + 1 voxels)/(N0 - 1) on channel 0, mean over 2 channels, 2 directions
    assert torch.allclose(inverse_consistency(ddf_ab, ddf_ab), torch.tensor([expected]), rtol=1e-5)


def test_icon_loss_normalisation_matches_paper():
    a, b = torch.rand(3, 1, 10, 12), torch.rand(3, 1, 10, 12)
    ident = IdentityMap(3, 2)
    out = ICONLoss("mse", lmbda=2048)(a, b, ident, ident)
    expected_sim = 2 * ((a - b) ** 2).mean()
    assert torch.allclose(out.similarity, expected_sim)
    assert out.inverse_consistency == 0
    assert torch.allclose(out.loss, expected_sim)
    assert out.folds.shape == (3,) and out.folds.sum() == 0

    shape = (10, 12)
    t = torch.tensor([0.02, 0.01]).reshape(1, 2, 1, 1).expand(3, 2, *shape).clone()
    out = ICONLoss("mse", lmbda=100, reduction="none")(a, b, DisplacementMap(t), DisplacementMap(t))
    assert out.loss.shape == (3,)
    ic = 2 * ((2 * torch.tensor([0.02, 0.01])) ** 2).mean()
    assert torch.allclose(out.inverse_consistency, ic.expand(3), rtol=1e-5)
    assert torch.allclose(out.loss, out.similarity + 100 * out.inverse_consistency)


@pytest.mark.parametrize(
    "similarity", ["mse", "lncc", "mi", LocalNormalizedCrossCorrelationLoss(3, 5, reduction="none")]
)
def test_similarities_plug_in_3d(similarity):
    a, b = torch.rand(2, 1, 12, 10, 9), torch.rand(2, 1, 12, 10, 9)
    phi = DisplacementMap(smooth_random_field(2, (12, 10, 9)))
    out = ICONLoss(similarity, lmbda=1.0, regularizer="gradicon", spatial_dims=3, reduction="none")(a, b, phi, phi)
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
    assert out.warped_A.shape == a.shape and out.phi_AB_grid.shape == (2, 3, 12, 10, 9)


def test_gradients_flow_to_network_parameters():
    torch.manual_seed(1)
    model = DisplacementField(UNet(2))
    a, b = torch.rand(2, 1, 20, 24), torch.rand(2, 1, 20, 24)
    out = ICONLoss("mse", lmbda=64)(a, b, model(a, b), model(b, a))
    out.loss.backward()
    grad = model.net.out.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # after one step the hidden layers receive gradient too (the zero-initialised output layer opened up)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    icon_loss(a, b, model(a, b), model(b, a), lmbda=64).backward()
    assert model.net.down[0].conv.weight.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    loss = ICONLoss("mse", lmbda=1.0)
    ident = IdentityMap(2, 2)
    a = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        loss(a, torch.rand(2, 1, 8, 9), ident, ident)
    with pytest.raises(ValueError, match="dimensions"):
        loss(torch.rand(8, 8), torch.rand(8, 8), ident, ident)
    bad = a.clone()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="image_B contain NaN"):
        loss(a, bad, ident, ident)
    with pytest.raises(ValueError, match="3D images"):
        ICONLoss("mse", 1.0, spatial_dims=3)(a, a, ident, ident)
    with pytest.raises(ValueError, match="unknown similarity 'ssd'"):
        ICONLoss("ssd", lmbda=1.0)
    with pytest.raises(ValueError, match="unknown regularizer"):
        ICONLoss("mse", lmbda=1.0, regularizer="bending")
    with pytest.raises(ValueError, match="not a valid LossReduction"):
        InverseConsistencyLoss(reduction="median")
    with pytest.raises(ValueError, match="shape is required"):
        inverse_consistency(ident, ident)


@pytest.mark.parametrize("similarity", ["mse", "lncc", "monai-lncc", "mi"])
def test_icon_loss_is_float32_inside_autocast(similarity):
    """Under mixed precision only the networks run in reduced precision: the loss (warps, similarity, inverse
    consistency) must equal its float32 value; autocast would run the filtering convolution of MONAI's LNCC (a
    similarity module a user may pass) and MI's joint-histogram product in bfloat16 / float16 (about 1 % off)."""
    a = torch.rand(4, 1, 64, 64).bfloat16().float()  # values that bfloat16 holds exactly
    b = (a + 0.3 * torch.rand(4, 1, 64, 64)).clamp(0, 1).bfloat16().float()
    phi_AB = DisplacementMap(smooth_random_field(4, (64, 64), 0.03))
    phi_BA = DisplacementMap(smooth_random_field(4, (64, 64), 0.03))
    if similarity == "monai-lncc":
        loss = ICONLoss(LocalNormalizedCrossCorrelationLoss(2, 7, reduction="none"), 64.0)
    else:
        loss = ICONLoss(similarity, 64.0)
    torch.manual_seed(1)
    expected = loss(a, b, phi_AB, phi_BA)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(a.bfloat16(), b.bfloat16(), phi_AB, phi_BA)  # bfloat16 images are taken as float32 too
    for name in ("loss", "similarity", "inverse_consistency"):
        value = getattr(got, name)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, getattr(expected, name), rtol=1e-5, atol=1e-6)


def test_inverse_consistency_on_a_random_fraction_of_the_points_is_an_unbiased_estimate():
    """point_fraction < 1 evaluates a random subset of the jittered grid points: zero for exact inverses, and its
    average over draws matches the full evaluation; 1 keeps the full grid (the same random stream as before)."""
    import math

    from monai_icon.losses import InverseConsistencyLoss, sample_points
    from monai_icon.networks.maps import DisplacementMap

    torch.manual_seed(0)
    shape = (10, 12, 8)
    field = torch.nn.functional.interpolate(torch.randn(2, 3, 3, 3, 3) * 0.03, size=shape, mode="trilinear",
                                            align_corners=True)
    phi_AB, phi_BA = DisplacementMap(field), DisplacementMap(0.5 * field)  # not inverses of each other
    full = InverseConsistencyLoss(reduction="none")
    part = InverseConsistencyLoss(reduction="none", point_fraction=0.25)
    reference = torch.stack([full(phi_AB, phi_BA, shape) for _ in range(200)]).mean(0)
    estimate = torch.stack([part(phi_AB, phi_BA, shape) for _ in range(800)]).mean(0)
    torch.testing.assert_close(estimate, reference, rtol=0.05, atol=0)
    points = sample_points(shape, 2, 1.0, fraction=0.25)
    assert points.shape == (2, 3, math.ceil(0.25 * 10 * 12 * 8))
    ident = DisplacementMap(torch.zeros(2, 3, *shape))
    assert float(part(ident, ident, shape).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="point_fraction"):
        InverseConsistencyLoss(point_fraction=0.0)


def test_gradicon_on_a_random_fraction_of_the_points_is_an_unbiased_estimate():
    """GradICON at a random quarter of the jittered points (fewer samplings per 3D step): its average over draws
    matches the full evaluation, it is exactly zero for exact inverses and exact for affine maps at any fraction,
    gradients reach both maps, and ICONLoss passes the fraction on."""
    from monai_icon.losses import GradientInverseConsistencyLoss
    from monai_icon.networks.maps import DisplacementMap

    torch.manual_seed(0)
    shape = (10, 12, 8)
    field = torch.nn.functional.interpolate(torch.randn(2, 3, 3, 3, 3) * 0.05, size=shape, mode="trilinear",
                                            align_corners=True)
    phi_AB, phi_BA = DisplacementMap(field), DisplacementMap(-0.5 * field)  # not inverses of each other
    full = GradientInverseConsistencyLoss(reduction="none")
    part = GradientInverseConsistencyLoss(reduction="none", point_fraction=0.25)
    reference = torch.stack([full(phi_AB, phi_BA, shape) for _ in range(100)]).mean(0)
    estimate = torch.stack([part(phi_AB, phi_BA, shape) for _ in range(800)]).mean(0)
    assert float(reference.min()) > 1e-3
    torch.testing.assert_close(estimate, reference, rtol=0.05, atol=0)
    ident = DisplacementMap(torch.zeros(2, 3, *shape))
    assert float(part(ident, ident, shape).abs().max()) < 1e-12
    # affine maps: the finite differences are exact everywhere, so any subset gives ||M_AB M_BA - I||^2 / D
    m_ab = torch.eye(3, 4).unsqueeze(0) + 0.05 * torch.tensor([[[0.0, 1.0, 0.0, 0.2], [0.0, 0.0, 0.5, 0.0],
                                                                [0.3, 0.0, 0.0, 0.0]]])
    m_ba = torch.eye(3, 4).unsqueeze(0) + 0.1 * torch.tensor([[[0.5, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.1],
                                                               [0.0, 0.3, 0.0, 0.0]]])
    j = m_ab[0, :, :3] @ m_ba[0, :, :3] - torch.eye(3)
    value = part(AffineMap(m_ab), AffineMap(m_ba), shape)
    torch.testing.assert_close(value, ((j**2).sum() / 3).reshape(1), rtol=1e-3, atol=0)
    field_ab, field_ba = field.clone().requires_grad_(), field.clone().requires_grad_()
    part(DisplacementMap(field_ab), DisplacementMap(-0.5 * field_ba), shape).sum().backward()
    assert field_ab.grad is not None and float(field_ab.grad.abs().sum()) > 0
    assert field_ba.grad is not None and float(field_ba.grad.abs().sum()) > 0
    loss = ICONLoss("mse", 1.0, "gradicon", spatial_dims=3, point_fraction=0.5, regularizer_size=shape)
    assert loss.regularizer.point_fraction == 0.5
    with pytest.raises(ValueError, match="point_fraction"):
        GradientInverseConsistencyLoss(point_fraction=1.5)


def test_mind_ssc_descriptor_ignores_intensity_mapping_and_registers_inverted_contrast():
    """MIND-SSC sees structure, not intensities: an inverted and rescaled copy (a T2-like from a T1-like image)
    has the same descriptor, and a translation between them is recovered with MIND where MSE fails."""
    import nibabel as nib
    import numpy as np

    from monai_icon.data import embedded_t1_head
    from monai_icon.losses import MINDSSCLoss, get_similarity, mind_ssc

    volume = torch.as_tensor(np.asarray(nib.load(embedded_t1_head()[0]).dataobj, dtype=np.float32))
    img = torch.nn.functional.interpolate(volume[:, :, 31][None, None], size=(64, 64), mode="area")
    img = (img - img.min()) / (img.max() - img.min())
    torch.testing.assert_close(mind_ssc(2.0 - 3.0 * img), mind_ssc(img), atol=1e-5, rtol=0)
    assert mind_ssc(img).shape == (1, 4, 64, 64)
    assert mind_ssc(volume[None, None, :32, :32, :16]).shape == (1, 12, 32, 32, 16)
    true = torch.tensor([3.0, -2.0]) / 63
    moving = 1.0 - DisplacementMap((-true).view(1, 2, 1, 1).expand(1, 2, 64, 64).contiguous()).warp(img)
    found = {}
    for name in ("mind", "mse"):
        sim = get_similarity(name, 2)
        t = torch.zeros(2, requires_grad=True)
        optimizer = torch.optim.Adam([t], lr=0.005)
        for _ in range(200):
            optimizer.zero_grad()
            warped = DisplacementMap(t.view(1, 2, 1, 1).expand(1, 2, 64, 64)).warp(moving)
            sim(warped, img).mean().backward()
            optimizer.step()
        found[name] = float(((t.detach() - true) * 63).norm())  # error in pixels
    assert found["mind"] < 0.5 and found["mse"] > 1.5, found
    with pytest.raises(ValueError, match="single-channel"):
        mind_ssc(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="2D"):
        MINDSSCLoss(spatial_dims=2)(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4))
    loss = ICONLoss("mind", 1.0, spatial_dims=2)
    assert type(loss.similarity).__name__ == "MINDSSCLoss"


def test_label_supervised_term_is_a_dice_loss_of_warped_labels_both_ways():
    """label_weight adds MONAI's Dice loss of the warped one-hot labels (both directions): 0 for identical labels
    under the identity, larger for disjoint ones; its gradient reaches the maps; the trainer requires labels."""
    from monai_icon.networks.maps import IdentityMap

    shape = (12, 12)
    label = torch.zeros(2, 1, *shape, dtype=torch.long)
    label[:, :, 2:6, 2:6] = 1
    other = torch.zeros_like(label)
    other[:, :, 7:11, 7:11] = 1
    images = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    ident = IdentityMap(2, 2)
    loss = ICONLoss("mse", 1.0, spatial_dims=2, label_weight=2.0, num_classes=2)
    same = loss(*images, ident, ident, label, label)
    apart = loss(*images, ident, ident, label, other)
    assert float(same.label_dice_loss) == pytest.approx(0.0, abs=1e-5)
    assert float(apart.label_dice_loss) == pytest.approx(2.0, abs=1e-3)  # Dice 0 each way
    plain = ICONLoss("mse", 1.0, spatial_dims=2)(*images, ident, ident)
    assert float(apart.loss) == pytest.approx(float(plain.loss) + 2.0 * 2.0, abs=1e-3)
    field = torch.zeros(2, 2, *shape, requires_grad=True)
    loss(*images, DisplacementMap(field), DisplacementMap(field), label, other).loss.backward()
    assert field.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_classes"):
        ICONLoss("mse", 1.0, spatial_dims=2, label_weight=1.0)
    with pytest.raises(ValueError, match="both label maps"):
        loss(*images, ident, ident, label, None)


def test_loss_masking_restricts_the_similarity_to_the_masks():
    """With masks the similarity of A o phi_AB against B is averaged over B's mask (and vice versa): differences
    outside the masks do not count; a similarity without per-voxel values (MI) is refused."""
    from monai_icon.networks.maps import IdentityMap

    a, b = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    b[:, :, :, 4:] = 1.0  # A and B differ only in the right half
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0
    ident = IdentityMap(2, 2)
    loss = ICONLoss("mse", 1.0, spatial_dims=2, reduction="none")
    assert float(loss(a, b, ident, ident).similarity[0]) == pytest.approx(1.0)  # 0.5 each way
    assert float(loss(a, b, ident, ident, mask_A=mask, mask_B=mask).similarity.abs().max()) < 1e-10
    assert float(loss(a, b, ident, ident, mask_A=1 - mask, mask_B=1 - mask).similarity[0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="per-voxel values"):
        ICONLoss("mi", 1.0, spatial_dims=2)(a, b, ident, ident, mask_A=mask, mask_B=mask)
    with pytest.raises(ValueError, match="both masks"):
        loss(a, b, ident, ident, mask_A=mask)
    with pytest.raises(ValueError, match="empty"):
        loss(a, b, ident, ident, mask_A=0 * mask, mask_B=mask)


def test_icon_loss_regularizer_size_sets_the_regularizers_grid():
    """``regularizer_size``: the regulariser gets that grid instead of the images' grid (and the similarity still
    compares the images on theirs); wrong lengths or sizes are refused."""
    seen = []

    def regularizer(phi_AB, phi_BA, shape):
        seen.append(tuple(shape))
        return torch.zeros(phi_AB.batch_size)

    images = torch.rand(2, 1, 12, 10), torch.rand(2, 1, 12, 10)
    identity = DisplacementMap(torch.zeros(2, 2, 6, 5))
    out = ICONLoss("mse", 1.0, regularizer, regularizer_size=(6, 5))(*images, identity, identity)
    ICONLoss("mse", 1.0, regularizer)(*images, identity, identity)
    assert seen == [(6, 5), (12, 10)]
    assert float(out.similarity) == pytest.approx(2 * float(((images[0] - images[1]) ** 2).mean()), rel=1e-5)
    # the default regulariser is a mean over points: the same exact inverses score 0 on any grid
    shift = torch.zeros(2, 2, 6, 5)
    shift[:, 0] = 0.05
    value = ICONLoss("mse", 1.0, regularizer_size=(7, 9))(*images, DisplacementMap(shift), DisplacementMap(-shift))
    assert float(value.inverse_consistency) < 1e-10
    for bad in ((6,), (6, 1), (6.0, 5), (True, 5)):
        with pytest.raises(ValueError, match="regularizer_size"):
            ICONLoss("mse", 1.0, regularizer_size=bad)


def test_multiscale_similarity_sums_the_similarity_of_pooled_pairs():
    import torch.nn.functional as F

    from monai_icon.losses import MultiScaleSimilarity, get_similarity, per_pair

    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 16, 12, 10), torch.rand(2, 1, 16, 12, 10)
    lncc = get_similarity("lncc", 3, kernel_size=3)
    value = MultiScaleSimilarity(lncc, (1, 2, 4), (1.0, 0.5, 0.25))(a, b)
    expected = (per_pair(lncc(a, b), 2) + 0.5 * per_pair(lncc(F.avg_pool3d(a, 2), F.avg_pool3d(b, 2)), 2)
                + 0.25 * per_pair(lncc(F.avg_pool3d(a, 4), F.avg_pool3d(b, 4)), 2))
    assert value.shape == (2,) and torch.allclose(value, expected)
    assert torch.allclose(MultiScaleSimilarity(lncc, (1,))(a, b), per_pair(lncc(a, b), 2))
    assert torch.allclose(MultiScaleSimilarity(lncc, (1, 2))(a, a), torch.full((2,), -2.0), atol=1e-4)
    pred = a.clone().requires_grad_(True)
    MultiScaleSimilarity(get_similarity("mse"), (1, 2), reduction="mean")(pred, b).backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    for kwargs, match in (({"factors": (0,)}, "factors"), ({"factors": (1, 2), "weights": (1.0,)}, "weights"),
                          ({"reduction": "max"}, "reduction")):
        with pytest.raises(ValueError, match=match):
            MultiScaleSimilarity(lncc, **kwargs)
    with pytest.raises(ValueError, match="shape"):
        MultiScaleSimilarity(lncc)(a, b[..., :8])
    with pytest.raises(ValueError, match="pooled"):
        MultiScaleSimilarity(lncc, (1, 32))(a, b)


def test_diffusion_energy_matches_autograd_through_the_differences():
    """The closed-form gradient is autograd's through ``torch.diff(...).pow(2).mean()``; bad shapes are refused."""
    from monai_icon.losses import diffusion_energy

    torch.manual_seed(0)
    for shape, scales in (((2, 3, 5, 6, 4), (4.0, 5.0, 3.0)), ((1, 2, 7, 3), (6.0, 2.0))):
        field = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        reference = sum(((torch.diff(field, dim=2 + d) * s) ** 2).mean() for d, s in enumerate(scales))
        (expected,) = torch.autograd.grad(3.0 * reference, field)
        value = diffusion_energy(field, scales)
        (gradient,) = torch.autograd.grad(3.0 * value, field)
        assert torch.allclose(value, reference, rtol=1e-12) and torch.allclose(gradient, expected, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda f: diffusion_energy(f, (2.0, 3.0)),
                                    (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True),))
    with pytest.raises(ValueError, match="one scale per spatial axis"):
        diffusion_energy(torch.zeros(1, 3, 4, 4, 4), (1.0, 1.0))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        diffusion_energy(torch.zeros(1, 3, 4, 1, 4), (1.0, 1.0, 1.0))
