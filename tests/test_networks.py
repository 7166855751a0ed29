import pytest
import torch
import torch.nn.functional as F

from monai_icon.networks.nets import MLP, AffineNet, ConvOnly, EncoderDecoder, UNet


def conv_params(cin, cout, k, dims, bias=True):
    return cin * cout * k**dims + (cout if bias else 0)


def count(net):
    return sum(p.numel() for p in net.parameters())


ENC, DEC = (16, 32, 64, 256, 512), (256, 128, 64, 32, 16)


def expected_encoder_decoder(dims, cin=2):
    total, width = 0, cin
    for c in ENC:
        total += conv_params(width, c, 3, dims)
        width = c
    for c in DEC:
        total += conv_params(width, c, 4, dims)
        width = c
    return total + conv_params(width, dims, 3, dims)


def expected_unet(dims, cin=2):
    total, width = 0, cin
    for c in ENC:
        total += 2 * width + conv_params(width, c, 3, dims)  # batch norm (weight, bias) + conv
        width = c
    skips = [cin, *ENC[:-1]][::-1]
    for c, skip in zip(DEC, skips):
        total += 2 * width + conv_params(width, c, 4, dims)
        width = c + skip
    return total + conv_params(width, dims, 3, dims)


def test_parameter_counts_match_the_papers_sizes():
    # MLP: 2 x 28 x 28 inputs, hidden 8000 and 3000, output 2 x 28 x 28
    assert count(MLP(2, (28, 28))) == (1568 * 8000 + 8000) + (8000 * 3000 + 3000) + (3000 * 1568 + 1568)
    # ConvOnly: five 5x5 layers of 10 features on the dense concatenation, then the output layer
    expected = sum(conv_params(2 + 10 * i, 10, 5, 2) for i in range(5)) + conv_params(52, 2, 5, 2)
    assert count(ConvOnly(2)) == expected == 30152
    assert count(EncoderDecoder(2)) == expected_encoder_decoder(2)
    assert count(UNet(2)) == expected_unet(2)
    assert count(UNet(3)) == expected_unet(3)


@pytest.mark.parametrize(
    "factory,shape",
    [
        (lambda: UNet(2), (28, 28)),
        (lambda: UNet(2), (37, 50)),
        (lambda: UNet(3, encoder_channels=(8, 16, 32), decoder_channels=(16, 8, 8)), (13, 10, 9)),
        (lambda: EncoderDecoder(2), (30, 41)),
        (lambda: EncoderDecoder(3, encoder_channels=(8, 16), decoder_channels=(16, 8)), (9, 6, 11)),
        (lambda: ConvOnly(2), (19, 23)),
        (lambda: ConvOnly(3), (7, 8, 9)),
        (lambda: MLP(2, (12, 10), hidden_channels=(64, 32)), (12, 10)),
        (lambda: MLP(3, (6, 5, 4), hidden_channels=(32,)), (6, 5, 4)),
    ],
)
def test_output_shape_and_zero_initialisation(factory, shape):
    net = factory()
    dims = len(shape)
    a, b = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    out = net(a, b)
    assert out.shape == (2, dims, *shape)
    assert torch.count_nonzero(out) == 0
    # one pre-concatenated 2-channel tensor gives the same as two images
    assert torch.equal(net(torch.cat([a, b], 1)), out)
    # once the output layer is perturbed the output depends on the input
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert torch.count_nonzero(net(a, b)) > 0


def test_affine_net_shape_and_zero_output():
    out = AffineNet(3)(torch.rand(2, 1, 9, 10, 11), torch.rand(2, 1, 9, 10, 11))
    assert out.shape == (2, 3, 4) and torch.count_nonzero(out) == 0


def test_network_input_errors():
    with pytest.raises(ValueError, match="input channels"):
        UNet(2)(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="2D network"):
        UNet(2)(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="built for images of size"):
        MLP(2, (12, 10), hidden_channels=(8,))(torch.rand(1, 1, 10, 12), torch.rand(1, 1, 10, 12))
    with pytest.raises(ValueError, match="spatial_dims"):
        ConvOnly(4)


def test_displacement_field_smoothing_keeps_constant_fields_and_damps_noise():
    """``DisplacementField(sigma=...)``: a Gaussian low-pass of the predicted displacement (replicate padding,
    so a constant displacement, e.g. a translation, is unchanged up to rounding; voxel noise is damped); gradients
    flow through it; bad sigmas are refused; multistep_registration passes ``coarse_sigma`` to its coarse steps."""
    from monai_icon.networks import DisplacementField, multistep_registration

    class Fixed(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = torch.nn.Parameter(value)

        def forward(self, image_A, image_B):
            return self.value

    a = torch.zeros(1, 1, 12, 10, 8)
    constant = torch.full((1, 3, 12, 10, 8), 0.05)
    assert torch.allclose(DisplacementField(Fixed(constant.clone()), sigma=2.0)(a, a).displacement, constant,
                          atol=1e-6)
    torch.manual_seed(0)
    noise = torch.randn(1, 3, 12, 10, 8) * 0.01
    block = DisplacementField(Fixed(noise.clone()), sigma=1.5)
    smoothed = block(a, a).displacement
    assert float(smoothed.std()) < 0.3 * float(noise.std())
    smoothed.sum().backward()
    assert block.net.value.grad is not None and torch.isfinite(block.net.value.grad).all()
    assert torch.equal(DisplacementField(Fixed(noise.clone()))(a, a).displacement, noise)
    for bad in (-1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="sigma"):
            DisplacementField(Fixed(noise), sigma=bad)
    net = multistep_registration(3, 2, coarse_steps=2, coarse_factor=1, encoder_channels=(4, 8),
                                 decoder_channels=(8, 4), coarse_sigma=1.0)
    assert [m.sigma for m in net.modules() if isinstance(m, DisplacementField)] == [1.0, 1.0]


def test_space_to_depth_keeps_every_voxel_and_averages_to_the_pooled_image():
    """``space_to_depth``: channel ``c * f^D + k`` holds offset ``k`` (C order) of each coarse voxel; odd sizes are
    replicate-padded like ``ceil_mode`` pooling, whose result is the mean over the ``f^D`` channels; 2D and 3D;
    the fine image is recovered exactly (nothing lost)."""
    from monai_icon.networks import space_to_depth

    torch.manual_seed(0)
    image = torch.rand(2, 2, 9, 8, 6)
    coarse = space_to_depth(image, 2)
    assert coarse.shape == (2, 16, 5, 4, 3)
    padded = F.pad(image, (0, 0, 0, 0, 0, 1), mode="replicate")
    assert torch.allclose(coarse.reshape(2, 2, 8, 5, 4, 3).mean(2), F.avg_pool3d(image, 2, ceil_mode=True), atol=1e-6)
    assert torch.equal(coarse[1, 8 + 5, 2, 1, 0], padded[1, 1, 2 * 2 + 1, 2 * 1 + 0, 2 * 0 + 1])  # k = 5 = (1, 0, 1)
    unfolded = coarse.reshape(2, 2, 2, 2, 2, 5, 4, 3).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(2, 2, 10, 8, 6)
    assert torch.equal(unfolded, padded)
    flat = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert space_to_depth(flat, 2)[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="space_to_depth"):
        space_to_depth(torch.rand(2, 4, 4), 2)


def test_multistep_registration_unshuffled_coarse_inputs():
    """``coarse_pool="unshuffle"``: the coarse U-Nets take ``in_channels * f^D`` channels, the model starts at the
    identity, its map depends on detail that average pooling removes, a model file may name it; unknown pools are
    refused."""
    from monai_icon.networks import Downsample, multistep_registration
    from monai_icon.networks.maps import identity_grid
    from monai_icon.networks.nets import UNet
    from monai_icon.networks.spec import build_network

    kwargs = dict(coarse_factor=2, encoder_channels=(4, 8), decoder_channels=(8, 4), resample_coarse=True)
    net = multistep_registration(3, 2, coarse_pool="unshuffle", **kwargs).eval()
    assert [m.in_channels for m in net.modules() if isinstance(m, UNet)] == [16, 16]
    assert net.block.pool == "unshuffle"
    torch.manual_seed(0)
    a, b = torch.rand(1, 1, 16, 16, 8), torch.rand(1, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.allclose(net.register(a, b).grid((16, 16, 8)), identity_grid((16, 16, 8)), atol=1e-6)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        checker = (torch.arange(16)[:, None, None] + torch.arange(16)[None, :, None]
                   + torch.arange(8)[None, None, :]) % 2
        detail = a + 0.2 * (checker.float() - 0.5)  # same 2x average pool as a
        assert torch.allclose(F.avg_pool3d(detail, 2), F.avg_pool3d(a, 2), atol=1e-6)
        moved = net.register(detail, b).grid((16, 16, 8)) - net.register(a, b).grid((16, 16, 8))
        assert float(moved.abs().max()) > 1e-4  # the network sees the fine detail
        spec = {"_target_": "monai_icon.networks.multistep_registration", "coarse_pool": "unshuffle", **kwargs}
        assert isinstance(build_network(spec).block, Downsample)
    with pytest.raises(ValueError, match="coarse_pool"):
        multistep_registration(3, 2, coarse_pool="max", **kwargs)
    with pytest.raises(ValueError, match="pool"):
        Downsample(net.block.block, 2, pool="nearest")


def test_unet_registration_one_step_is_the_papers_network_and_more_steps_compose():
    """``unet_registration(steps=1)`` has the keys of ``RegistrationNet(DisplacementField(UNet(2)))`` (the shipped
    2D model loads into it); ``steps=2`` is two U-Nets composed (``TwoStep``), starting at the identity; a model file
    may name it; bad step counts are refused."""
    from monai_icon.networks import DisplacementField, RegistrationNet, TwoStep, unet_registration
    from monai_icon.networks.nets import UNet
    from monai_icon.networks.spec import build_network

    one = unet_registration(2, steps=1, encoder_channels=(4, 8), decoder_channels=(8, 4))
    paper = RegistrationNet(DisplacementField(UNet(2, encoder_channels=(4, 8), decoder_channels=(8, 4))))
    assert one.state_dict().keys() == paper.state_dict().keys()
    two = unet_registration(2, steps=2, encoder_channels=(4, 8), decoder_channels=(8, 4))
    assert isinstance(two.block, TwoStep)
    assert {k.split(".")[1] for k in two.state_dict()} == {"first", "second"}
    ddf = two(torch.rand(2, 2, 16, 16))
    assert ddf.shape == (2, 2, 16, 16) and float(ddf.abs().max()) == 0.0
    built = build_network({"_target_": "monai_icon.networks.unet_registration", "spatial_dims": 2, "steps": 2,
                           "encoder_channels": [4, 8], "decoder_channels": [8, 4]}, "test")
    built.load_state_dict(two.state_dict())
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            unet_registration(2, steps=bad)


def test_unet_pad_multiple_pads_less_and_keeps_the_default():
    """``pad_multiple``: by default ``2 ** depth`` (unchanged); on sizes that need no padding every value gives the
    same output; a smaller value processes fewer voxels on other sizes (odd levels rounded up, the decoder cropped
    to each skip) and still returns the input's size; ``unet_padding`` sets it for a context and restores it."""
    from monai_icon.networks.nets import unet_padding

    torch.manual_seed(0)
    net = UNet(3, 2, (4, 8, 8, 8, 8), (8, 8, 8, 8, 4)).eval()
    torch.nn.init.normal_(net.out.weight, 0, 0.1)
    assert net.pad_multiple == 32
    seen = []
    net.down[0].register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[2:])))
    aligned = torch.rand(1, 2, 32, 64, 32)
    with torch.no_grad():
        reference = net(aligned)
        with unet_padding(net, 1) as same:
            assert same is net and net.pad_multiple == 1
            torch.testing.assert_close(net(aligned), reference)
            odd = net(torch.rand(2, 2, 24, 28, 17))
        assert net.pad_multiple == 32
        padded = net(torch.rand(2, 2, 24, 28, 17))
    assert odd.shape == padded.shape == (2, 3, 24, 28, 17)
    assert seen[-2:] == [(24, 28, 17), (32, 32, 32)]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="pad_multiple"):
            UNet(3, 2, (4, 8), (8, 4), pad_multiple=bad)
        with pytest.raises(ValueError, match="pad_multiple"):
            with unet_padding(net, bad):
                pass
        assert net.pad_multiple == 32


def test_networks_take_the_memory_format_of_channels_last_weights():
    """With channels-last weights (``to_channels_last``) a network converts its input once, the values unchanged; with
    ordinary weights the input is left as it is."""
    from monai_icon.engines.trainer import to_channels_last
    from monai_icon.networks.nets import TallUNet
    from monai_icon.networks.nets._utils import in_weight_format

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 4, 3)
    x = torch.randn(2, 2, 6, 5, 4)
    assert in_weight_format(x, conv) is x and in_weight_format(x, torch.nn.ReLU()) is x
    to_channels_last(conv)
    cl = in_weight_format(x, conv)
    assert cl.is_contiguous(memory_format=torch.channels_last_3d) and not cl.is_contiguous()
    assert torch.equal(cl, x)
    planar = torch.randn(2, 2, 6, 5)
    assert in_weight_format(planar, conv) is planar
    image_A, image_B = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    factories = [lambda: UNet(3, 2, (4, 8), (8, 4)), lambda: EncoderDecoder(3, 2, (4, 8), (8, 4)),
                 lambda: ConvOnly(3, 2, features=4, num_layers=2, kernel_size=3),
                 lambda: TallUNet(3, 1, (4, 8), (4, 8))]
    for factory in factories:
        net = factory().eval()
        for p in net.parameters():  # the zero-initialised output convolution would hide differences
            p.data.normal_(0, 0.1)
        with torch.no_grad():
            expected = net(image_A, image_B)
            to_channels_last(net)
            got = net(image_A, image_B)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
