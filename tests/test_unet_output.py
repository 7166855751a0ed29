# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""monai_icon.backend.unet_output: the U-Net's last decoder layer and output convolution as one coarse convolution
gives the layers' values (borders included) wherever it runs, and runs only in CPU float32 evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_icon import backend
from monai_icon.backend import CPUBackend, use_backend
from monai_icon.backend import unet_output as head_module
from monai_icon.networks.nets import UNet
from monai_icon.networks.nets.unet import unet_padding

OFF = CPUBackend("off")
ON = CPUBackend("off", fused_unet_head=True)


def random_unet(dims: int, encoder, decoder, pad_multiple: int | None = None) -> UNet:
    net = UNet(dims, 2, encoder, decoder, pad_multiple=pad_multiple).eval()
    generator = torch.Generator().manual_seed(dims + len(encoder))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)  # the output convolution is zero-initialised
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return net


def fused_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = head_module._fused
    monkeypatch.setattr(head_module, "_fused", lambda *args: calls.append(1) or original(*args))
    return calls


@pytest.mark.parametrize("dims, size, encoder, decoder", [
    (3, (16, 24, 8), (4, 8, 8), (8, 8, 6)),  # the last layer's input wider than its output (truncated shortcut)
    (3, (8, 8, 8), (2, 3), (3, 12)),  # narrower (zero-padded shortcut)
    (2, (32, 16), (4, 8), (8, 5)),
    (2, (12, 20), (3, 4, 6), (6, 4, 8)),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_fused_head_gives_the_layers_values_borders_included(monkeypatch, dims, size, encoder, decoder, batch):
    net = random_unet(dims, encoder, decoder)
    x = torch.randn(batch, 2, *size, generator=torch.Generator().manual_seed(batch))
    calls = fused_calls(monkeypatch)
    with torch.no_grad():
        with use_backend(OFF, "cpu"):
            expected = net(x)
        with use_backend(ON, "cpu"):
            got = net(x)
    assert calls == [1]
    scale = float(expected.abs().max())
    assert scale > 1.0  # not a trivially small output
    torch.testing.assert_close(got, expected, atol=2e-6 * scale, rtol=0)
    # the borders, where the composition needs its corrections, are as close as the rest
    border = torch.ones_like(expected, dtype=torch.bool)
    border[(slice(None), slice(None), *[slice(1, -1)] * dims)] = False
    assert float((got - expected)[border].abs().max()) <= 2e-6 * scale


def test_channels_last_inputs_and_weights_give_the_same_values(monkeypatch):
    net = random_unet(3, (4, 8), (8, 6))
    x = torch.randn(2, 2, 8, 12, 16)
    calls = fused_calls(monkeypatch)
    with torch.no_grad(), use_backend(OFF, "cpu"):
        expected = net(x)
    net = net.to(memory_format=torch.channels_last_3d)
    with torch.no_grad(), use_backend(ON, "cpu"):
        got = net(x.contiguous(memory_format=torch.channels_last_3d))
    assert calls == [1]
    torch.testing.assert_close(got, expected, atol=2e-6 * float(expected.abs().max()), rtol=0)


def test_new_weight_values_are_used_after_an_in_place_update(monkeypatch):
    net = random_unet(2, (4, 8), (8, 6))
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad(), use_backend(ON, "cpu"):
        before = net(x)
        net.out.weight.mul_(2.0)  # as an optimiser step would: the cached composition must not be reused
        net.up[-1].conv.bias.add_(1.0)
        after = net(x)
        with use_backend(OFF, "cpu"):
            expected = net(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=2e-6 * float(expected.abs().max()), rtol=0)


def test_it_runs_only_in_cpu_float32_evaluation_of_matching_shapes(monkeypatch):
    net = random_unet(3, (4, 8), (8, 6), pad_multiple=1)
    calls = fused_calls(monkeypatch)
    with use_backend(ON, "cpu"):
        net(torch.randn(1, 2, 8, 8, 8))  # autograd: the layers, whose backward training needs
        assert calls == []
        with torch.no_grad():
            net.double()(torch.randn(1, 2, 8, 8, 8, dtype=torch.float64))  # float64
            net.float()
            net(torch.randn(1, 2, 9, 8, 8))  # 9 -> 5: the last decoder output (10) is cropped to 9
            assert calls == []
            with use_backend(OFF, "cpu"):
                net(torch.randn(1, 2, 8, 8, 8))  # the setting off
            assert calls == []
            net(torch.randn(1, 2, 8, 8, 8))
            assert calls == [1]
    with use_backend(CPUBackend("on"), "cuda"):  # everything off on another device
        assert not backend.active().fused_unet_head


def test_unusual_layers_are_left_to_the_caller():
    x, skip = torch.randn(1, 4, 4, 4), torch.randn(1, 2, 8, 8)
    norm = nn.BatchNorm2d(4).eval()
    with torch.no_grad(), use_backend(ON, "cpu"):
        out = nn.Conv2d(5, 2, 3, padding=1)
        assert backend.unet_head(x, skip, norm, nn.ConvTranspose2d(4, 3, 4, 2, 1), 0.01, out) is not None
        assert backend.unet_head(x, skip, norm, nn.ConvTranspose2d(4, 3, 2, 2, 0), 0.01, out) is None  # kernel 2
        assert backend.unet_head(x, skip, norm, nn.ConvTranspose2d(4, 3, 4, 2, 1), 0.01,
                                 nn.Conv2d(5, 2, 3, padding=1, padding_mode="replicate")) is None
        assert backend.unet_head(x, skip, norm, nn.ConvTranspose2d(4, 3, 4, 2, 1), 0.01,
                                 nn.Conv2d(5, 2, 5, padding=2)) is None  # kernel 5
        assert backend.unet_head(x, skip[..., :7], norm, nn.ConvTranspose2d(4, 3, 4, 2, 1), 0.01, out) is None


def test_a_transposed_convolution_without_bias():
    x, skip = torch.randn(2, 4, 5, 6), torch.randn(2, 2, 10, 12)
    norm, up = nn.BatchNorm2d(4).eval(), nn.ConvTranspose2d(4, 3, 4, 2, 1, bias=False)
    out = nn.Conv2d(5, 2, 3, padding=1)
    with torch.no_grad():
        expected = out(torch.cat([up(torch.nn.functional.leaky_relu(norm(x), 0.2))
                                  + torch.nn.functional.interpolate(x[:, :3], scale_factor=2.0), skip], 1))
        with use_backend(ON, "cpu"):
            got = backend.unet_head(x, skip, norm, up, 0.2, out)
    assert got is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_transfer_models_unet_is_unchanged_on_its_grid():
    """The shipped 3D model's first U-Net on a 48x56x48 grid (an isotropic brain grid), batch 2."""
    from conftest import ROOT

    from monai_icon.apps import load_registration_model

    model = load_registration_model(ROOT / "bundle/knee3d_icon/models/brain_transfer_model.pt", isotropic=True)
    unet = next(m for m in model.network.modules() if isinstance(m, UNet))
    x = torch.rand(2, 2, 48, 56, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), unet_padding(unet, 1):
        with use_backend(OFF, "cpu"):
            expected = unet(x)
        with use_backend(ON, "cpu"):
            got = unet(x)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_the_composed_weights_of_freed_networks_are_dropped_when_the_cache_is_full(monkeypatch):
    monkeypatch.setattr(head_module, "_CACHE", {})
    monkeypatch.setattr(head_module, "_MAX_CACHED", 10)
    x = torch.randn(1, 2, 8, 8)
    sizes = []
    for _ in range(3):  # each 2D network adds 5 entries (its head, its 4 edges); the earlier ones are freed
        net = random_unet(2, (4, 8), (8, 6))
        with torch.no_grad(), use_backend(ON, "cpu"):
            net(x)
        sizes.append(len(head_module._CACHE))
    assert sizes == [5, 10, 5]  # the third network found the cache full of freed networks' weights
    assert all(ref() is not None for refs, _ in head_module._CACHE.values() for ref in refs if ref is not None)


def test_inference_mode_networks_and_calls(monkeypatch):
    """A network made under ``torch.inference_mode`` (weights without version counters) and one called under it
    (compositions built outside it, reused in ``no_grad`` afterwards) give the layers' values."""
    monkeypatch.setattr(head_module, "_CACHE", {})
    x = torch.randn(2, 2, 12, 8)
    with torch.inference_mode():
        made_there = random_unet(2, (4, 8), (8, 6))
    normal = random_unet(2, (3, 6), (6, 5))
    for net in (made_there, normal):
        with torch.inference_mode(), use_backend(ON, "cpu"):
            first = net(x)
        with torch.no_grad(), use_backend(ON, "cpu"):
            second = net(x)
        with torch.no_grad(), use_backend(OFF, "cpu"):
            expected = net(x)
        scale = float(expected.abs().max())
        torch.testing.assert_close(first, expected, atol=2e-6 * scale, rtol=0)
        torch.testing.assert_close(second, expected, atol=2e-6 * scale, rtol=0)
    assert len(head_module._CACHE) == 5  # the normal network's compositions only


def test_a_trace_records_the_layers(monkeypatch):
    net = random_unet(2, (4, 8), (8, 6))
    calls = fused_calls(monkeypatch)
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad(), use_backend(ON, "cpu"):
        traced = torch.jit.trace(net, x, check_trace=False)  # (a check would run the network eagerly too)
        assert calls == []
        with use_backend(OFF, "cpu"):
            expected = net(x)
        torch.testing.assert_close(traced(x), expected)
    assert "conv_transpose" in str(traced.inlined_graph) or "_convolution" in str(traced.inlined_graph)
