# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""monai_icon.backend: the one CPU setting (resolution per device and mode), its one context, its hooks, the earlier
module paths, and the CUDA code path (everything off) checked without a GPU."""

from __future__ import annotations

import contextvars
import dataclasses
import threading

import pytest
import torch

from monai_icon import backend
from monai_icon.backend import DEFAULT, CPUBackend, ResolvedBackend, active, use_backend
from monai_icon.backend import settings as settings_module

FIELDS = [f.name for f in dataclasses.fields(ResolvedBackend)]
COMPILED = {"fast_sampler", "compiled_lncc"}


def values(resolved: ResolvedBackend) -> dict[str, bool]:
    return dataclasses.asdict(resolved)


@pytest.fixture
def compiler(monkeypatch):
    """Set whether a C++ compiler is found (``compiler(True)`` / ``compiler(False)``)."""
    return lambda found: monkeypatch.setattr(settings_module, "compiler_available", lambda: found)


@pytest.fixture
def allocator_calls(monkeypatch):
    """The calls of the allocator tuning from the backend (none made for real; a fresh once-per-process flag)."""
    calls: list[int] = []
    monkeypatch.setattr(settings_module, "tune_cpu_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(settings_module, "_tuned", {})
    return calls


def test_auto_turns_on_what_pays_on_the_cpu_and_compiles_only_with_a_compiler(compiler):
    compiler(True)
    assert values(CPUBackend().resolve("cpu")) == dict.fromkeys(FIELDS, True)
    assert values(CPUBackend("auto").resolve(torch.device("cpu"))) == dict.fromkeys(FIELDS, True)
    compiler(False)
    assert values(CPUBackend("auto").resolve("cpu")) == {n: n not in COMPILED for n in FIELDS}
    assert values(CPUBackend("on").resolve("cpu")) == dict.fromkeys(FIELDS, True)  # they fall back at run time
    assert values(CPUBackend("off").resolve("cpu")) == dict.fromkeys(FIELDS, False)
    assert CPUBackend(" AUTO ").mode == "auto"


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda"), "meta", "mps"])
@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_every_optimisation_is_off_on_other_devices(compiler, device, mode):
    compiler(True)
    assert values(CPUBackend(mode).resolve(device)) == dict.fromkeys(FIELDS, False)
    explicit = CPUBackend(mode, **dict.fromkeys(FIELDS, True))  # even where asked for one by one
    assert values(explicit.resolve(device)) == dict.fromkeys(FIELDS, False)


def test_per_optimisation_values_override_the_mode(compiler):
    compiler(True)
    resolved = CPUBackend("auto", fast_sampler=False, tune_allocator=False).resolve("cpu")
    assert values(resolved) == {n: n not in ("fast_sampler", "tune_allocator") for n in FIELDS}
    only = CPUBackend("off", compiled_lncc=True).resolve("cpu")
    assert values(only) == {n: n == "compiled_lncc" for n in FIELDS}


def test_unknown_modes_and_values_are_refused_naming_the_option():
    for bad in ("fast", "", "true"):
        with pytest.raises(ValueError, match="cpu_backend"):
            CPUBackend(bad)
    with pytest.raises(ValueError, match="cpu_backend"):
        backend.as_backend("sometimes")
    with pytest.raises(TypeError, match="cpu_backend"):
        backend.as_backend(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fast_sampler"):
        CPUBackend(fast_sampler="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpu_backend"):
        with use_backend("fastest", "cpu"):
            pass
    with pytest.raises(TypeError, match="device"):
        with use_backend("auto"):  # which device: the optimisations must not reach a GPU run by default
            pass


def test_the_context_sets_the_settings_and_restores_them_when_nested(compiler, allocator_calls):
    compiler(False)
    assert active() == DEFAULT and DEFAULT.planar_sampler and not DEFAULT.fast_sampler
    with use_backend("on", "cpu") as on:
        assert active() == on and on.fast_sampler
        with use_backend(CPUBackend("off"), "cpu") as off:
            assert active() == off == ResolvedBackend()
            with use_backend("on", "cuda"):
                assert active() == ResolvedBackend()
            assert active() == off
        assert active() == on
        given = ResolvedBackend(compiled_lncc=True)
        with use_backend(given, "cuda"):  # a resolved backend is taken as it is
            assert active() is given
        assert active() == on
    assert active() == DEFAULT
    with pytest.raises(RuntimeError):
        with use_backend("on", "cpu"):
            raise RuntimeError("restored on errors too")
    assert active() == DEFAULT


def test_threads_and_contexts_keep_their_own_settings():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        seen["start"] = active()
        with use_backend("off", "cpu"):
            inside.set()
            release.wait(10)
            seen["inside"] = active()

    with use_backend(CPUBackend("auto", fast_sampler=True), "cpu") as mine:
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert inside.wait(10)
        assert active() == mine  # the other thread's context does not reach this one
        release.set()
        thread.join(10)
        assert seen == {"start": DEFAULT, "inside": ResolvedBackend()}

        def in_a_copied_context():
            with use_backend("off", "cpu"):
                return active()

        assert contextvars.copy_context().run(in_a_copied_context) == ResolvedBackend()
        assert active() == mine


def test_the_allocator_is_tuned_once_and_on_the_cpu_only(allocator_calls):
    for device in ("cuda", "cuda:0", "meta"):
        with use_backend("auto", device):
            pass
    with use_backend("off", "cpu"), use_backend(CPUBackend("auto", tune_allocator=False), "cpu"):
        pass
    assert allocator_calls == []
    with use_backend("auto", "cpu"):
        assert allocator_calls == [1]
    with use_backend("on", "cpu"):
        pass
    assert allocator_calls == [1]


def large_sampling():
    field = torch.rand(1, 1, 64, 32, 64)
    points = torch.rand(1, 3, 2**17)
    return field, points


def test_the_hooks_return_none_when_off():
    field, points = large_sampling()
    image = torch.rand(1, 1, 64, 64, 64)
    for device in ("cpu", "cuda"):
        with use_backend("off" if device == "cpu" else "on", device):
            assert backend.sample(field, points, "bilinear", "border") is None
            assert backend.sample(torch.rand(1, 2, 64, 64), points[:, :2], "bilinear", "border") is None
            kernel_vol = torch.tensor(125.0)
            assert backend.lncc(image, image, kernel_vol, (1.0,) * 5, 1e-5, 1e-5) is None
    # outside any context, the samplers that need no compilation run (grid_sample's values up to rounding)
    planar = backend.sample(field, points, "bilinear", "border")
    assert planar is not None and planar.shape == (1, 1, 2**17)
    assert backend.lncc(image, image, torch.tensor(125.0), (1.0,) * 5, 1e-5, 1e-5) is None  # compiled: opt-in
    with use_backend(CPUBackend("on", threaded_sampler=False), "cpu"):
        assert backend.sample(field, points, "nearest", "border") is None  # none of the trilinear kernels' cases


def test_interpolate_gives_grid_samples_values_whatever_the_setting():
    from monai_icon.networks.maps import interpolate

    field, points = large_sampling()
    with use_backend("off", "cpu"):
        plain = interpolate(field, points)
    with use_backend(CPUBackend("on", fast_sampler=False), "cpu"):
        planar = interpolate(field, points)
    # positions along axis 1 read to 2^(11 - 24) voxels (rows of 64 x 32), values in [0, 1] with slopes below 1
    torch.testing.assert_close(planar, plain, rtol=0, atol=2e-4)


def test_the_earlier_module_paths_still_work():
    import monai_icon.compilation
    import monai_icon.cpu_allocator
    from monai_icon.backend import allocator, compilation, lncc_kernels, trilinear
    from monai_icon.losses import compiled_lncc
    from monai_icon.networks import trilinear as old_trilinear

    assert monai_icon.compilation.compiler_available is compilation.compiler_available
    assert monai_icon.cpu_allocator.tune_cpu_allocator is allocator.tune_cpu_allocator
    assert old_trilinear.planar_trilinear_interpolate is trilinear.planar_trilinear_interpolate
    assert compiled_lncc.lncc_forward is lncc_kernels.lncc_forward
    with old_trilinear.fast_trilinear():
        assert active() == dataclasses.replace(DEFAULT, fast_sampler=True) and old_trilinear._state["enabled"]
        with compiled_lncc.compiled_lncc():
            assert active().fast_sampler and active().compiled_lncc and compiled_lncc._state["enabled"]
            with old_trilinear.fast_trilinear(False):
                assert not active().fast_sampler and active().compiled_lncc
        assert not compiled_lncc._state["enabled"]
    assert active() == DEFAULT
    assert old_trilinear._state["failed"] is trilinear._state["failed"]


def _trainer(device, **kwargs):
    """An ICONTrainer on ``device``, built only (nothing runs, so no GPU is needed for ``"cuda"``)."""
    from monai_icon.engines import ICONTrainer
    from monai_icon.losses import ICONLoss
    from monai_icon.networks import DisplacementField, RegistrationNet
    from monai_icon.networks.nets import UNet

    net = RegistrationNet(DisplacementField(UNet(3, encoder_channels=(4, 8), decoder_channels=(8, 4))))
    loss = ICONLoss("lncc", 1.0, spatial_dims=3)
    return ICONTrainer(device, 1, [], net, torch.optim.SGD(net.parameters(), 0.1), loss, **kwargs), net


def test_a_trainer_resolves_its_backend_on_its_device(compiler):
    compiler(True)
    cpu, net = _trainer("cpu", backend="auto")
    assert cpu.cpu_settings == CPUBackend().resolve("cpu") and cpu.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in net.parameters() if p.ndim == 5)
    for device in ("cuda", "cuda:0"):
        gpu, net = _trainer(device, backend="auto", cpu_amp=True)
        assert gpu.cpu_settings == ResolvedBackend() and not gpu.channels_last and gpu.cpu_amp is False
        assert all(p.is_contiguous() for p in net.parameters())  # weights left as they are
        field, points = large_sampling()
        with use_backend(gpu.cpu_settings):  # what each of its iterations enters: no CPU kernel runs
            assert backend.sample(field, points, "bilinear", "border") is None
    default, _ = _trainer("cpu")
    assert default.backend is None and default.cpu_settings is None and not default.channels_last


def test_the_trainers_earlier_keywords_map_into_the_backend(compiler):
    from monai_icon.engines.trainer import trainer_backend

    compiler(True)
    assert trainer_backend(None, "cpu", {}) is None
    off = dict.fromkeys(("fast_sampler", "compiled_lncc", "channels_last"), False)
    assert trainer_backend(None, "cpu", off) is None
    old = trainer_backend(None, "cpu", {"fast_sampler": True}).resolve("cpu")
    assert old == dataclasses.replace(DEFAULT, fast_sampler=True)  # the defaults plus what was asked for
    assert trainer_backend(None, "cuda", {"channels_last": True}).resolve("cuda") == ResolvedBackend()
    assert trainer_backend("auto", "cpu", {"channels_last": True}) == CPUBackend("auto")  # they agree
    assert trainer_backend("off", "cuda", {"fast_sampler": False}) == CPUBackend("off")
    with pytest.raises(ValueError, match="fast_sampler"):
        trainer_backend("off", "cpu", {"fast_sampler": True})
    with pytest.raises(ValueError, match="channels_last"):
        trainer_backend(CPUBackend("auto", channels_last=False), "cpu", {"channels_last": True})
    with pytest.raises(TypeError, match="compiled_lncc"):
        trainer_backend(None, "cpu", {"compiled_lncc": "yes"})
    with pytest.raises(TypeError, match="unexpected"):
        trainer_backend(None, "cpu", {"fast_samplr": True})
    with pytest.raises(ValueError, match="cpu_backend"):
        _trainer("cpu", backend="fast")
    trainer, _ = _trainer("cpu", fast_sampler=True, channels_last=True)
    assert trainer.cpu_settings == dataclasses.replace(DEFAULT, fast_sampler=True, channels_last=True)


def test_the_mixed_precision_policy_on_cuda():
    from monai_icon.config import cuda_amp

    assert cuda_amp(True, "cuda:0") is True and cuda_amp("true", torch.device("cuda")) is True
    assert cuda_amp(True, "cpu") is False and cuda_amp(False, "cuda") is False
    trainer, _ = _trainer("cuda", cpu_amp=True)
    assert trainer.cpu_amp is False  # bfloat16 autocast on the CPU only


def test_distributed_network_takes_channels_last_from_the_backend(compiler):
    from monai_icon.engines.distributed import distributed_network
    from monai_icon.networks.nets import UNet

    compiler(False)
    for backend_value, expected in (("auto", True), ("off", False), (None, False)):
        net = distributed_network(UNet(3, encoder_channels=(4, 8), decoder_channels=(8, 4)), "cpu",
                                  backend=backend_value)
        weights = [p for p in net.parameters() if p.ndim == 5]
        assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights) is expected


def test_the_allocator_is_tuned_for_runs_without_a_context_on_the_cpu_only(allocator_calls):
    assert backend.tune_allocator_for("auto", "cuda:0") is False and allocator_calls == []
    assert backend.tune_allocator_for(CPUBackend("auto", tune_allocator=False), "cpu") is False
    assert backend.tune_allocator_for("auto", torch.device("cpu")) is True and allocator_calls == [1]
    assert backend.tune_allocator_for("on", "cpu") is True and allocator_calls == [1]  # once per process


def test_the_command_line_setting_and_its_expert_flags():
    import argparse

    from monai_icon.apps.cli import _cpu_backend, build_parser

    def backend_of(mode, **flags):
        return _cpu_backend(argparse.Namespace(cpu_backend=mode, **flags))

    # auto: what needs no compilation (a single registration would wait for the compiler)
    assert backend_of("auto") == CPUBackend("auto", fast_sampler=False, compiled_lncc=False)
    expert = CPUBackend("auto", fast_sampler=True, compiled_lncc=False)
    assert backend_of("auto", fast_sampler=True, compiled_lncc=False) == expert
    assert backend_of("on") == CPUBackend("on")
    assert backend_of("off", compiled_lncc=True) == CPUBackend("off", fast_sampler=False, compiled_lncc=True)
    assert backend_of("auto").resolve("cuda") == ResolvedBackend()
    parser = build_parser()
    for command in ("register", "register-pairs"):
        action = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions  # type: ignore
                      if a.dest == "cpu_backend")
        assert action.default == "auto" and list(action.choices) == ["auto", "on", "off"]


def test_the_resize_hook_runs_only_where_its_setting_and_the_field_allow():
    """``maps.resize_linear`` asks ``backend.resize``: the matrix products on CPU with ``matrix_resize`` (the
    default), PyTorch's ``F.interpolate`` itself when it is off, on other devices and for half precision."""
    import torch.nn.functional as F

    from monai_icon.networks.maps import resize_linear

    field = torch.randn(1, 3, 5, 4, 6)
    reference = F.interpolate(field, size=(9, 7, 11), mode="trilinear", align_corners=True)
    assert backend.resize(field, (9, 7, 11)) is not None  # the default settings
    torch.testing.assert_close(resize_linear(field, (9, 7, 11)), reference)
    with use_backend("off", "cpu"):
        assert backend.resize(field, (9, 7, 11)) is None
        assert torch.equal(resize_linear(field, (9, 7, 11)), reference)
    with use_backend(CPUBackend("auto", matrix_resize=False), "cpu"):
        assert backend.resize(field, (9, 7, 11)) is None
    with use_backend("on", "cuda"):  # everything off for another device
        assert backend.resize(field, (9, 7, 11)) is None
    assert backend.resize(field.half(), (9, 7, 11)) is None
    assert backend.resize(field.to("meta"), (9, 7, 11)) is None
    assert CPUBackend("auto").resolve("cpu").matrix_resize and not CPUBackend("off").resolve("cpu").matrix_resize


def test_the_quantiles_hook_selects_where_its_setting_and_the_values_allow():
    """``backend.quantiles``: ``torch.quantile``'s values (linear interpolation) by partial sorting on CPU with
    ``selection_quantiles`` (the default); ``None`` when it is off, on other devices, for integer values. The
    network grid's percentile normalisation gives MONAI's ``ScaleIntensityRangePercentiles`` values either way."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentiles

    from monai_icon.transforms.network_grid import percentile_range, to_network_grid

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        values = torch.randn(3, 17, 11, dtype=dtype).exp()
        q = [0.0, 0.01, 0.5, 0.99, 1.0]
        expected = torch.quantile(values.flatten(), torch.tensor(q, dtype=dtype))
        out = backend.quantiles(values, q)
        assert out is not None and out.dtype == dtype
        # float32: torch interpolates between the order statistics in float32, NumPy in float64
        torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0.0)
    assert backend.quantiles(torch.arange(10), [0.5]) is None
    with use_backend("off", "cpu"):
        assert backend.quantiles(values, [0.5]) is None
    with use_backend(CPUBackend("auto", selection_quantiles=False), "cpu"):
        assert backend.quantiles(values, [0.5]) is None
    with use_backend("on", "cuda"):
        assert backend.quantiles(values, [0.5]) is None
    image = MetaTensor(torch.randn(1, 9, 8, 7).exp())
    reference = ScaleIntensityRangePercentiles(1.0, 99.0, 0.0, 1.0, clip=True)(image)
    for mode in ("auto", "off"):  # the selection, and the kthvalue fallback
        with use_backend(mode, "cpu"):
            low, high = percentile_range(image, (1.0, 99.0))
            torch.testing.assert_close(torch.tensor([low, high]),
                                       torch.quantile(image.flatten(), torch.tensor([0.01, 0.99])))
            out = to_network_grid(image, (9, 8, 7), resize_mode="trilinear")
            torch.testing.assert_close(out.as_tensor(), reference.as_tensor())
    assert CPUBackend("auto").resolve("cpu").selection_quantiles
    assert not CPUBackend("off").resolve("cpu").selection_quantiles
