# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The LNCC's compiled form: its plain functions against MONAI's loss, where the loss takes it, the compiled values
and gradients against the eager ones, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from conftest import activate_backend

from monai_icon.backend import lncc_kernels as kernels
from monai_icon.compilation import compiler_available
from monai_icon.losses import compiled_lncc as module
from monai_icon.losses.compiled_lncc import (
    COMPILED_LNCC_MIN_VOXELS, compiled_lncc, lncc_backward, lncc_forward, padded_filtering, use_compiled_lncc,
)
from monai_icon.losses.similarity import StackedLNCCLoss

needs_compiler = pytest.mark.skipif(not compiler_available(), reason="no C++ compiler for Inductor")


def fresh_state(monkeypatch, enabled: bool = False) -> None:
    """This test's own compile cache (no compiled functions or signatures, no earlier failure in the session), the
    compiled LNCC ``enabled`` outside any context."""
    monkeypatch.setattr(kernels, "_state", {"forward": None, "backward": None, "failed": None,
                                            "signatures": {"forward": set(), "backward": set()}})
    activate_backend(monkeypatch, compiled_lncc=enabled)


def images(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(shape, generator=g, dtype=dtype)
    return base, (base + 0.3 * torch.rand(shape, generator=g, dtype=dtype)) ** 1.5


@pytest.mark.parametrize("spatial_dims,kernel_type", [(2, "rectangular"), (3, "rectangular"), (3, "gaussian")])
def test_plain_functions_match_monai_value_and_both_gradients(spatial_dims, kernel_type):
    shape = (2, 1, 9, 8, 7)[: spatial_dims + 2]
    pred, target = images(shape)
    reference = LocalNormalizedCrossCorrelationLoss(spatial_dims, kernel_size=5, kernel_type=kernel_type,
                                                    reduction="none")
    p, t = pred.clone().requires_grad_(True), target.clone().requires_grad_(True)
    weights = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = -reference(p, t)
    grad_p, grad_t = torch.autograd.grad((theirs * weights).sum(), (p, t))
    taps = tuple(float(w) for w in reference.kernel)
    kernel_vol = reference.kernel_vol.to(pred)
    ncc, sums = lncc_forward(pred, target, kernel_vol, taps, reference.smooth_nr, reference.smooth_dr)
    torch.testing.assert_close(ncc, theirs.detach(), rtol=1e-9, atol=1e-9)
    ours_p, ours_t = lncc_backward(weights, pred, target, sums, kernel_vol, taps, reference.smooth_nr,
                                   reference.smooth_dr, True, True)
    torch.testing.assert_close(ours_p, grad_p, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours_t, grad_t, rtol=1e-7, atol=1e-9)
    only_t = lncc_backward(weights, pred, target, sums, kernel_vol, taps, reference.smooth_nr, reference.smooth_dr,
                           False, True)
    assert only_t[0] is None
    torch.testing.assert_close(only_t[1], grad_t, rtol=1e-7, atol=1e-9)


def test_padded_filtering_is_the_zero_padded_separable_filter():
    from monai.networks.layers import separable_filtering

    x = torch.randn(2, 3, 6, 9, 5, dtype=torch.float64)
    taps = (0.25, 0.5, 1.0, 0.5, 0.25)
    kernel = torch.tensor(taps, dtype=torch.float64)
    torch.testing.assert_close(padded_filtering(x, taps), separable_filtering(x, [kernel] * 3))


def test_the_loss_takes_the_compiled_lncc_only_where_it_pays(monkeypatch):
    fresh_state(monkeypatch)
    monkeypatch.setattr(kernels, "compiler_available", lambda: True)
    large = torch.zeros(1, 1, COMPILED_LNCC_MIN_VOXELS)
    assert not use_compiled_lncc(large, large)  # opt-in only
    with compiled_lncc():
        assert use_compiled_lncc(large, large)
        with compiled_lncc(False):
            assert not use_compiled_lncc(large, large)
        assert use_compiled_lncc(large, large)  # restored
        assert not use_compiled_lncc(large[..., :-1], large[..., :-1])  # too few voxels
        assert not use_compiled_lncc(large.double(), large.double())
        assert not use_compiled_lncc(large, large.reshape(1, 1, -1, 2))
        assert not use_compiled_lncc(large.to("meta"), large.to("meta"))
        with compiled_lncc(False):
            assert not use_compiled_lncc(large, large)
        monkeypatch.setattr(kernels, "compiler_available", lambda: False)
        assert not use_compiled_lncc(large, large)
    assert module._state["enabled"] is False


@needs_compiler
def test_compiled_loss_matches_the_eager_loss(monkeypatch):
    fresh_state(monkeypatch)
    pred, target = images((1, 1, 64, 64, 64), seed=3, dtype=torch.float32)
    loss = StackedLNCCLoss(spatial_dims=3, kernel_size=5, reduction="none")

    def value_and_grad():
        p = pred.clone().requires_grad_(True)
        value = loss(p, target)
        (grad,) = torch.autograd.grad(value.reshape(1, -1).mean(1).sum(), p)
        return value.detach(), grad

    eager = value_and_grad()
    with compiled_lncc():
        compiled = value_and_grad()
    assert module._state["signatures"]["forward"] and module._state["signatures"]["backward"]
    assert module._state["failed"] is None
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-4 * eager[1].abs().max().item())


def test_a_failed_compilation_warns_once_and_computes_eagerly(monkeypatch):
    fresh_state(monkeypatch, enabled=True)
    monkeypatch.setattr(kernels, "compiler_available", lambda: True)

    def broken(*args):
        raise RuntimeError("no toolchain")

    monkeypatch.setattr(kernels, "_compiled", lambda name: broken)
    pred, target = images((1, 1, COMPILED_LNCC_MIN_VOXELS // 4096, 64, 64), dtype=torch.float32)
    loss = StackedLNCCLoss(spatial_dims=3, kernel_size=3, reduction="mean")
    with pytest.warns(RuntimeWarning, match="no toolchain"):
        value = loss(pred, target)
    assert "no toolchain" in module._state["failed"]
    assert not use_compiled_lncc(pred, target)
    with compiled_lncc(False):
        torch.testing.assert_close(value, loss(pred, target))


def test_signatures_beyond_the_limit_stay_eager(monkeypatch):
    fresh_state(monkeypatch, enabled=True)
    monkeypatch.setattr(kernels, "compiler_available", lambda: True)
    monkeypatch.setattr(kernels, "_MAX_SIGNATURES", 0)
    monkeypatch.setattr(kernels, "_compiled", lambda name: pytest.fail("compiled beyond the limit"))
    pred, target = images((1, 1, COMPILED_LNCC_MIN_VOXELS // 4096, 64, 64), dtype=torch.float32)
    p = pred.clone().requires_grad_(True)
    loss = StackedLNCCLoss(spatial_dims=3, kernel_size=3, reduction="mean")
    loss(p, target).backward()
    assert p.grad is not None and module._state["failed"] is None


@pytest.mark.parametrize("flag", [False, True])
def test_trainer_computes_the_loss_inside_the_compiled_context_only_when_asked(flag):
    from conftest import assert_trainer_iterates_inside_a_context_only_when_asked

    assert_trainer_iterates_inside_a_context_only_when_asked("compiled_lncc", flag, module._state)
