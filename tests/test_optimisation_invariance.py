"""Speed-ups must not change results: exact-equivalence checks and values pinned before the optimisations.

The pinned numbers come from the plain implementation (without chunked CPU grid sampling and the identity-grid
fast paths) with the same seeds.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import smooth_random_field
from monai_icon.backend.trilinear import chunked_grid_sample as _chunked_grid_sample
from monai_icon.losses import ICONLoss
from monai_icon.networks import DisplacementField, Downsample, TwoStep
from monai_icon.networks.maps import ComposedMap, DisplacementMap, Map, interpolate
from monai_icon.networks.nets import UNet

PINNED = {
    # (dims, similarity, regularizer): loss, similarity, inverse consistency, sum|phi_AB grid|, sum warped A, sum|grad|
    (2, "mse", "icon"): [
        56.07643508911133,
        0.2396763265132904,
        0.10905617475509644,
        3139.127685546875,
        1438.0196533203125,
        67938.4609375,
    ],
    (2, "lncc", "gradicon"): [
        372138.09375,
        -0.21459311246871948,
        726.8326416015625,
        3139.127685546875,
        1438.0196533203125,
        869112512.0,
    ],
    (3, "mse", "icon"): [
        95.00359344482422,
        0.22791670262813568,
        0.1851087510585785,
        32015.435546875,
        10211.8984375,
        825624.4375,
    ],
    (3, "lncc", "icon"): [
        94.39559173583984,
        -0.3800916075706482,
        0.1851087510585785,
        32015.435546875,
        10211.8984375,
        825344.1875,
    ],
}


def _evaluate(dims, similarity, regularizer):
    torch.manual_seed(0)
    if dims == 3:
        nets = [UNet(3, encoder_channels=(8, 16, 32), decoder_channels=(16, 8, 8)) for _ in range(2)]
        model = Downsample(TwoStep(DisplacementField(nets[0]), DisplacementField(nets[1])))
        shape, batch = (34, 30, 20), 1
    else:
        nets = [UNet(2, encoder_channels=(8, 16, 32), decoder_channels=(16, 8, 8))]
        model = DisplacementField(nets[0])
        shape, batch = (40, 36), 2
    with torch.no_grad():
        for n in nets:
            n.out.weight.normal_(0, 0.02)
    a, b = torch.rand(batch, 1, *shape), torch.rand(batch, 1, *shape)
    out = ICONLoss(similarity, 512.0, regularizer, spatial_dims=dims)(a, b, model(a, b), model(b, a))
    out.loss.backward()
    grad = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
    return [
        out.loss.item(),
        out.similarity.item(),
        out.inverse_consistency.item(),
        out.phi_AB_grid.abs().sum().item(),
        out.warped_A.sum().item(),
        grad.item(),
    ]


@pytest.mark.parametrize("key", list(PINNED))
def test_loss_maps_and_gradients_are_pinned(key):
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, 4}):  # the chunking depends on the thread count: results must not
            torch.set_num_threads(n)
            values = _evaluate(*key)
            assert values[:5] == pytest.approx(PINNED[key][:5], rel=2e-5, abs=1e-6)
            assert values[5] == pytest.approx(PINNED[key][5], rel=2e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("setting", ["autocast", "matmul-precision"])
def test_sampling_ignores_reduced_precision_settings(setting):
    """Coordinates must not pass through operations that autocast or ``set_float32_matmul_precision`` lower
    (a matmul-based grid conversion, tried once, moved points by half a voxel under them)."""
    from contextlib import ExitStack

    torch.manual_seed(0)
    field = torch.randn(1, 3, 9, 8, 7)
    points = torch.rand(1, 3, 5000) * 1.2 - 0.1
    expected = interpolate(field, points)
    previous = torch.get_float32_matmul_precision()
    try:
        with ExitStack() as stack:
            if setting == "autocast":
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            else:
                torch.set_float32_matmul_precision("medium")
            got = interpolate(field, points)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(got.float(), expected)


@pytest.mark.parametrize("shape", [(13, 17), (9, 8, 11)])
def test_chunked_grid_sample_equals_one_call(shape):
    dims = len(shape)
    field = torch.randn(2, 3, *shape, requires_grad=True)
    points = 1.2 * torch.rand(2, 1001, dims) - 0.1  # odd count: exercises the padding; some points outside
    grid = (points * 2 - 1).requires_grad_()
    one = F.grid_sample(
        field, grid.reshape(2, 1001, *([1] * (dims - 1)), dims), align_corners=True, padding_mode="border"
    )
    one = one.reshape(2, 3, 1001)
    chunked = _chunked_grid_sample(field, grid, 3, "bilinear", "border")
    assert torch.equal(chunked, one)
    weights = torch.randn_like(one)
    g1 = torch.autograd.grad((one * weights).sum(), (field, grid))
    g2 = torch.autograd.grad((chunked * weights).sum(), (field, grid))
    assert torch.allclose(g1[0], g2[0], atol=1e-5) and torch.equal(g1[1], g2[1])


@pytest.mark.parametrize("coarse,fine", [((6, 7), (6, 7)), ((6, 7), (11, 13)), ((4, 5, 3), (7, 9, 5))])
def test_grid_fast_paths_equal_generic_evaluation(coarse, fine):
    phi = DisplacementMap(smooth_random_field(2, coarse, 0.1))
    psi = DisplacementMap(smooth_random_field(2, coarse, 0.1))
    assert torch.allclose(phi.grid(fine), Map.grid(phi, fine), atol=1e-6)
    composed = ComposedMap(phi, psi)
    assert torch.allclose(composed.grid(fine), Map.grid(composed, fine), atol=1e-6)
    # and interpolate() at the grid points agrees as well
    x = Map.grid(DisplacementMap(torch.zeros(1, len(fine), *fine)), fine)
    assert torch.allclose(interpolate(phi.displacement, x), phi.grid(fine) - x, atol=1e-6)


@pytest.mark.parametrize("kernel_type", ["rectangular", "triangular", "gaussian"])
@pytest.mark.parametrize("shape", [(3, 5, 19, 17), (2, 3, 11, 4, 9), (1, 2, 2, 30)])
def test_shifted_filtering_equals_monai_separable_filtering(kernel_type, shape):
    """The CPU fast path of the LNCC's filtering: same values as MONAI's depthwise convolution (zero padding),
    also where an axis is shorter than the kernel."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss
    from monai.networks.layers import separable_filtering

    from monai_icon.losses.similarity import shifted_filtering

    torch.manual_seed(0)
    kernel = LocalNormalizedCrossCorrelationLoss(len(shape) - 2, 7, kernel_type).kernel.double()
    x = torch.rand(shape, dtype=torch.float64)
    ours = shifted_filtering(x, tuple(kernel.tolist()), len(shape) - 2)
    ref = separable_filtering(x, [kernel] * (len(shape) - 2))
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    x32 = x.float()
    assert torch.allclose(shifted_filtering(x32, tuple(kernel.tolist()), len(shape) - 2), ref.float(), atol=1e-5)
    with pytest.raises(ValueError, match="odd number of taps"):
        shifted_filtering(x, (1.0, 1.0), len(shape) - 2)
    with pytest.raises(ValueError, match="spatial axes"):
        shifted_filtering(x, (1.0, 1.0, 1.0), len(shape) - 1)


@pytest.mark.parametrize("radius", [1, 2, 3, 4])
@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_shifted_filtering_box_path_equals_separable_filtering(radius, weight):
    """A box kernel (equal taps, LNCC's rectangular window) takes the pairwise-sum path on axes longer than the
    kernel and the generic path on shorter ones: the same values as MONAI's convolution either way (axes of length
    2 r, 2 r + 1, 2 r + 2 and longer; one tap weight scales once per axis), contiguous output, and the input is
    left untouched."""
    from monai.networks.layers import separable_filtering

    from monai_icon.losses.similarity import shifted_filtering

    torch.manual_seed(radius)
    length = 2 * radius + 1
    taps = (weight,) * length
    kernel = torch.full((length,), weight, dtype=torch.float64)
    for shape in [(2, 3, length, length + 1, 2 * radius), (1, 5, 17, length + 9, 13), (3, 2, 2 * radius + 2, 4)]:
        x = torch.randn(shape, dtype=torch.float64)
        before = x.clone()
        ours = shifted_filtering(x, taps, len(shape) - 2)
        ref = separable_filtering(x, [kernel] * (len(shape) - 2))
        assert ours.shape == ref.shape and ours.is_contiguous()
        assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12), (shape, float((ours - ref).abs().max()))
        assert torch.equal(x, before)
    # an input that requires grad (autograd through the public function): the same values and gradients
    leaf = torch.randn(2, 3, 11, length + 2, 9, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 11, length + 2, 9, dtype=torch.float64)
    (grad,) = torch.autograd.grad((shifted_filtering(leaf, taps, 3) * weights).sum(), leaf)
    (ref_grad,) = torch.autograd.grad((separable_filtering(leaf, [kernel] * 3) * weights).sum(), leaf)
    assert torch.allclose(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_stacked_lncc_uses_no_convolution_on_any_device(monkeypatch):
    """The LNCC's filtering is elementwise on every device: cuDNN runs float32 convolutions in TF32 by default,
    which would round the local sums whose differences the LNCC takes (no convolution may be called; shapes are
    also checked on the meta device, which stands for any non-CPU device)."""
    from monai_icon.losses import StackedLNCCLoss

    def no_convolution(*args, **kwargs):
        raise AssertionError("the LNCC called a convolution")

    for name in ("conv1d", "conv2d", "conv3d"):
        monkeypatch.setattr(F, name, no_convolution)
        monkeypatch.setattr(torch, name, no_convolution)
    for device in ("cpu", "meta"):
        for shape in ((2, 1, 12, 10), (1, 1, 9, 8, 7)):
            pred = torch.rand(shape).to(device).requires_grad_()
            value = StackedLNCCLoss(len(shape) - 2, 7, reduction="none")(pred, torch.rand(shape).to(device))
            assert value.shape == shape and value.device.type == device
            (grad,) = torch.autograd.grad(value.sum(), pred)
            assert grad.shape == pred.shape


@pytest.mark.parametrize("dims,kernel_type", [(2, "rectangular"), (2, "gaussian"), (3, "triangular")])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_stacked_lncc_equals_monai_lncc(dims, kernel_type, reduction):
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    from monai_icon.losses import StackedLNCCLoss

    shape = (3, 2, 19, 17) if dims == 2 else (2, 1, 11, 9, 8)
    pred = torch.rand(shape, requires_grad=True)
    target = torch.rand(shape)
    ours = StackedLNCCLoss(dims, 5, kernel_type, reduction=reduction)(pred, target)
    ref = LocalNormalizedCrossCorrelationLoss(dims, 5, kernel_type, reduction=reduction)(pred, target)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(ours.sum(), pred)[0]
    g_ref = torch.autograd.grad(ref.sum(), pred)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "dims,kernel_type", [(2, "rectangular"), (2, "gaussian"), (3, "rectangular"), (3, "triangular")]
)
@pytest.mark.parametrize("needs", ["pred", "target", "both"])
def test_stacked_lncc_closed_form_gradient(dims, kernel_type, needs):
    """The hand-written backward equals autograd through MONAI's loss in double precision, for the prediction,
    the target or both, including flat regions where the local variance sits at the ``smooth_dr`` floor."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    from monai_icon.losses import StackedLNCCLoss

    torch.manual_seed(0)
    shape = (2, 2, 13, 11) if dims == 2 else (2, 1, 9, 8, 7)
    pred = torch.rand(shape, dtype=torch.float64)
    target = torch.rand(shape, dtype=torch.float64)
    pred[..., :4, :4] = 0.5  # flat patches: variance below the floor, masked out of the gradient
    target[..., -4:, :5] = 0.25
    pred.requires_grad_(needs in ("pred", "both"))
    target.requires_grad_(needs in ("target", "both"))
    inputs = [x for x in (pred, target) if x.requires_grad]
    weights = torch.rand(shape, dtype=torch.float64)  # a non-uniform upstream gradient
    ours = StackedLNCCLoss(dims, 5, kernel_type, reduction="none").double()
    ref = LocalNormalizedCrossCorrelationLoss(dims, 5, kernel_type, reduction="none").double()
    value_ours, value_ref = ours(pred, target), ref(pred, target)
    assert torch.allclose(value_ours, value_ref, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad((value_ours * weights).sum(), inputs)
    g_ref = torch.autograd.grad((value_ref * weights).sum(), inputs)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_stacked_lncc_gradcheck():
    from monai_icon.losses import StackedLNCCLoss

    torch.manual_seed(0)
    pred, target = (torch.rand(1, 1, 7, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(StackedLNCCLoss(2, 3, reduction="none").double(), (pred, target))


def test_stacked_lncc_refuses_double_backward_and_asymmetric_kernels():
    from monai_icon.losses import StackedLNCCLoss

    pred = torch.rand(1, 1, 9, 9, requires_grad=True)
    value = StackedLNCCLoss(2, 3, reduction="sum")(pred, torch.rand(1, 1, 9, 9))
    (grad,) = torch.autograd.grad(value, pred, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|double backward|once_differentiable"):
        grad.sum().backward()
    with pytest.raises(ValueError, match="symmetric"):
        class Skewed(StackedLNCCLoss):
            def register_buffer(self, name, tensor, persistent=True):
                if name == "kernel":
                    tensor = torch.tensor([1.0, 2.0, 3.0])
                super().register_buffer(name, tensor, persistent)

        Skewed(2, 3)


@pytest.mark.parametrize(
    "dims,similarity,regularizer", [(2, "mse", "icon"), (2, "lncc", "gradicon"), (3, "mse", "icon")]
)
def test_loss_traces_without_graph_breaks(dims, similarity, regularizer):
    """``torch.compile`` sees the whole ICON loss (maps, warps, similarity, inverse consistency, folds) as one
    graph: no data-dependent checks or thread queries inside it."""
    torch.manual_seed(0)
    shape = (24, 20) if dims == 2 else (12, 10, 8)
    a, b = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    ddf = 0.3 * torch.randn(2, dims, *shape)
    phi_AB, phi_BA = DisplacementMap(ddf), DisplacementMap(-ddf)
    loss = ICONLoss(similarity, 512.0, regularizer, spatial_dims=dims)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(a, b, phi_AB, phi_BA)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_trainer_equals_eager():
    """``ICONTrainer(compile=True)`` trains exactly as eager (same jitter: ``fallback_random``), with MetaTensor
    inputs, a changing lambda (as the adaptive schedule changes it) and unchanged state-dict keys. (SGD: Adam's
    first, sign-like steps would amplify rounding differences of the compiled convolutions.)"""
    import torch._inductor.config as inductor_config
    from monai.data import MetaTensor
    from monai.engines.utils import IterationEvents

    from monai_icon.engines import ICONTrainer
    from monai_icon.networks import RegistrationNet

    torch.manual_seed(0)
    images = [MetaTensor(torch.rand(2, 1, 32, 28)) for _ in range(6)]
    batches = [{"moving_image": images[i], "fixed_image": images[i + 1]} for i in range(0, 6, 2)]
    results = []
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):  # Inductor's own patching: restores the option on exit
        for compile_ in (False, True):
            torch.manual_seed(0)
            net = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(8, 16, 32), decoder_channels=(16, 8, 8))))
            with torch.no_grad():  # off the voxel nodes, where bilinear sampling has no unique derivative
                net.block.net.out.weight.normal_(0, 0.02)
            keys = list(net.state_dict())
            loss = ICONLoss("lncc", 64.0, spatial_dims=2)
            trainer = ICONTrainer(
                "cpu", 1, batches, net, torch.optim.SGD(net.parameters(), 1e-4), loss, compile=compile_, decollate=False
            )
            losses = []

            @trainer.on(IterationEvents.MODEL_COMPLETED)
            def record(engine):
                losses.append(float(engine.state.output["loss"]))
                engine.loss_function.lmbda *= 1.5  # the adaptive schedule's kind of change

            torch.manual_seed(1)
            trainer.run()
            assert list(net.state_dict()) == keys
            results.append((losses, [p.detach().clone() for p in net.parameters()], loss.lmbda))
    (l0, w0, lam0), (l1, w1, lam1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert lam0 == lam1 == 64.0 * 1.5**3
    for a, b in zip(w0, w1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_trainer_equals_default(spatial_dims):
    """``ICONTrainer(channels_last=True)`` keeps the same parameter objects (the optimiser still holds them) and
    state dict, stores convolution weights channels-last, 2D convolutions compute channels-last (the default: the
    standard layout), and it trains as the default layout up to rounding."""
    from monai.data import MetaTensor
    from monai.engines.utils import IterationEvents

    from monai_icon.engines import ICONTrainer
    from monai_icon.networks import RegistrationNet

    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    shape = (2, 1, 32, 28) if spatial_dims == 2 else (1, 1, 16, 16, 12)
    torch.manual_seed(0)
    images = [MetaTensor(torch.rand(shape)) for _ in range(4)]
    batches = [{"moving_image": images[i], "fixed_image": images[i + 1]} for i in range(0, 4, 2)]
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = RegistrationNet(DisplacementField(UNet(spatial_dims, encoder_channels=(8, 16), decoder_channels=(8, 8))))
        with torch.no_grad():  # off the voxel nodes, where linear sampling has no unique derivative
            net.block.net.out.weight.normal_(0, 0.02)
        params, keys = list(net.parameters()), list(net.state_dict())
        initial = [p.detach().clone() for p in params]
        trainer = ICONTrainer(
            "cpu",
            1,
            batches,
            net,
            # a rate at which the loss falls: at 1e-3 the second step's loss is 10-20 times the first's, a step that
            # amplifies the layouts' rounding differences (different summation orders) far beyond rounding
            torch.optim.SGD(params, 1e-4),
            ICONLoss("mse", 64.0, spatial_dims=spatial_dims),
            decollate=False,
            channels_last=channels_last,
        )
        assert list(net.parameters()) == params and list(net.state_dict()) == keys
        conv_weights = [p for p in params if p.ndim == spatial_dims + 2]
        assert conv_weights and all(p.is_contiguous(memory_format=fmt) == channels_last for p in conv_weights)
        seen, losses = [], []
        first_conv = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        first_conv.register_forward_hook(lambda m, args, out: seen.append(out.is_contiguous(memory_format=fmt)))
        trainer.on(IterationEvents.MODEL_COMPLETED)(lambda e: losses.append(float(e.state.output["loss"])))
        torch.manual_seed(1)
        trainer.run()
        assert len(seen) == 4  # two pairs, both directions
        if spatial_dims == 2:  # torch 2.13's CPU 3D convolutions compute in the standard layout either way
            assert all(s == channels_last for s in seen)
        assert losses[1] < losses[0]
        results.append((losses, [p.detach().clone() for p in params]))
    (l0, w0), (l1, w1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(w0, w1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float((a - b).abs().max()) for a, b in zip(w0, initial)) > 1e-4  # the steps moved the weights
