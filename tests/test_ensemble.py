# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Test-time ensembling: displacement inverses, reflections of maps, and the ensemble of a block's estimates."""

import pytest
import torch

from monai_icon.networks import (
    DisplacementMap, RegistrationModule, RegistrationNet, TestTimeEnsemble, ensemble_network, multistep_registration,
)
from monai_icon.networks.maps import identity_grid


def _smooth_displacement(shape, amplitude, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, len(shape), *([4] * len(shape)), generator=generator, dtype=torch.float64) * amplitude
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("shape", [(20, 16), (12, 10, 14)])
def test_inverse_of_a_smooth_map_composes_to_the_identity(shape):
    """``phi(phi^-1(x)) = x`` at the grid points to far below a voxel (0.3 voxel displacements, no folds), and the
    inverse of a constant displacement is its negative exactly."""
    phi = DisplacementMap(_smooth_displacement(shape, 0.3 / max(shape)))
    inverse = phi.inverse(30)
    identity = identity_grid(shape, dtype=torch.float64)
    error = (phi(inverse.grid(shape)) - identity).abs().max()
    assert float(error) < 1e-4 / max(shape), float(error)
    assert float((inverse.grid(shape) - identity).abs().max()) > 0.1 / max(shape)  # not a trivial inverse
    constant = DisplacementMap(torch.full((2, len(shape), *shape), 0.05, dtype=torch.float64))
    torch.testing.assert_close(constant.inverse(1).displacement, -constant.displacement)
    with pytest.raises(ValueError, match="iterations"):
        phi.inverse(0)


def test_flipped_map_is_the_reflection_conjugate():
    """``R o phi o R`` evaluated as a map equals the reflection applied around ``phi`` at random points, and
    reflecting twice gives the map back."""
    shape = (9, 7, 8)
    phi = DisplacementMap(_smooth_displacement(shape, 0.05, seed=1).float())
    points = torch.rand(1, 3, 50)

    def reflect(p, axes):
        p = p.clone()
        for a in axes:
            p[:, a] = 1.0 - p[:, a]
        return p

    for axes in ([0], [2], [0, 1]):
        torch.testing.assert_close(phi.flipped(axes)(points), reflect(phi(reflect(points, axes)), axes))
        torch.testing.assert_close(phi.flipped(axes).flipped(axes).displacement, phi.displacement)
    assert phi.flipped([]) is phi
    for bad in ([3], [0, 0], [-1]):
        with pytest.raises(ValueError, match="axes"):
            phi.flipped(bad)


class _Translation(RegistrationModule):
    """``phi_AB``: a translation along axis 0 by ``gain * (centroid_0(A) - centroid_0(B)) + bias`` (a displacement
    field on the images' grid): inverse consistent and mirror-equivariant when ``bias`` is 0."""

    def __init__(self, bias: float = 0.0, gain: float = 1.0) -> None:
        super().__init__()
        self.bias, self.gain = bias, gain

    def compute_map(self, image_A, image_B):
        shape = image_A.shape[2:]
        weights = identity_grid(shape, dtype=image_A.dtype)[:, :1]

        def centroid(image):
            return (image * weights).flatten(1).sum(1) / image.flatten(1).sum(1)

        shift = self.gain * (centroid(image_A) - centroid(image_B)) + self.bias
        displacement = torch.zeros(image_A.shape[0], len(shape), *shape, dtype=image_A.dtype)
        displacement[:, 0] = shift.reshape(-1, *([1] * len(shape)))
        return DisplacementMap(displacement)


def _blob_pair(shape=(16, 12, 10)):
    grid = identity_grid(shape)[0]

    def blob(centre):
        return torch.exp(-((grid - torch.tensor(centre).reshape(3, 1, 1, 1)) ** 2).sum(0) / 0.02)[None, None]

    return blob((0.45, 0.5, 0.5)), blob((0.55, 0.5, 0.5))


def test_ensemble_keeps_a_consistent_block_and_cancels_an_inconsistent_bias():
    """A block that is inverse consistent and mirror-equivariant gives the same map with and without the ensemble;
    a constant bias (``phi_AB`` and ``phi_BA`` both shifted the same way, i.e. not inverse consistent) is removed
    by the symmetric ensemble, and a flip along the translation's axis cancels it too."""
    image_A, image_B = _blob_pair()
    exact = _Translation()(image_A, image_B).displacement
    for flips in ((), (0,), (0, 2)):
        ensemble = TestTimeEnsemble(_Translation(), symmetric=True, flip_axes=flips)
        torch.testing.assert_close(ensemble(image_A, image_B).displacement, exact, atol=1e-5, rtol=0)
    biased = _Translation(bias=0.04)
    assert float((biased(image_A, image_B).displacement - exact).abs().max()) > 0.03
    for ensemble in (TestTimeEnsemble(biased, symmetric=True), TestTimeEnsemble(biased, False, flip_axes=(0,))):
        torch.testing.assert_close(ensemble(image_A, image_B).displacement, exact, atol=1e-5, rtol=0)
    # a reflection across another axis does not undo a bias along axis 0
    kept = TestTimeEnsemble(biased, False, flip_axes=(1,))(image_A, image_B).displacement
    torch.testing.assert_close(kept, biased(image_A, image_B).displacement, atol=1e-5, rtol=0)


def test_ensemble_of_a_network_both_directions_agree_with_single_calls():
    """On a U-Net model (composed steps, resampled on the coarse grid): ``forward_both`` gives the same maps as
    ``compute_map`` in each direction, on the network's field grid; the wrapper shares the weights."""
    torch.manual_seed(0)
    network = multistep_registration(coarse_steps=2, coarse_factor=2, encoder_channels=(4, 8),
                                     decoder_channels=(8, 4), resample_coarse=True).eval()
    with torch.no_grad():  # zero-initialised outputs: give the last layers weights so the maps are not identities
        for module in network.modules():
            if isinstance(module, torch.nn.Conv3d) and module.out_channels == 3:
                module.weight.normal_(0, 0.05)
    wrapped = ensemble_network(network, symmetric=True, flip_axes=[0])
    assert isinstance(wrapped, RegistrationNet) and wrapped.block.block is network.block
    image_A, image_B = (torch.rand(2, 1, 16, 8, 12) for _ in range(2))
    with torch.no_grad():
        ab, ba = wrapped(image_A, image_B)
        torch.testing.assert_close(ab.displacement, wrapped.register(image_A, image_B).displacement)
        torch.testing.assert_close(ba.displacement, wrapped.register(image_B, image_A).displacement)
        assert ab.displacement.shape == (2, 3, 8, 4, 6)  # the coarse steps' grid
        plain = network.register(image_A, image_B).displacement
        assert float((ab.displacement - plain).abs().max()) > 1e-4  # the estimates differ, the mean is not one
        assert wrapped(torch.cat([image_A, image_B], 1)).shape == (2, 3, 16, 8, 12)  # MONAI's DDF interface


def _counted(block):
    """``block`` with a counter of its calls and of the pairs they held (batch elements)."""
    calls = []
    original = block.compute_map

    def compute_map(image_A, image_B):
        calls.append(image_A.shape[0])
        return original(image_A, image_B)

    block.compute_map = compute_map
    return block, calls


def test_batched_estimates_equal_one_call_per_pair():
    """``batch_estimates`` (the default) evaluates the block once on all reflected and swapped pairs stacked along
    the batch axis: the same maps (both directions, two passes, a batch of two pairs) as one call per pair, in one
    call per pass; in training mode (batch statistics) the block is called once per pair."""
    torch.manual_seed(0)
    network = multistep_registration(coarse_steps=2, coarse_factor=2, encoder_channels=(4, 8),
                                     decoder_channels=(8, 4), resample_coarse=True).eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.Conv3d) and module.out_channels == 3:
                module.weight.normal_(0, 0.05)
    block, calls = _counted(network.block)
    image_A, image_B = (torch.rand(2, 1, 16, 8, 12) for _ in range(2))
    results = {}
    for batched in (True, False):
        calls.clear()
        wrapped = ensemble_network(block, symmetric=True, flip_axes=[0, 2], passes=2, batch_estimates=batched)
        with torch.no_grad():
            results[batched] = (wrapped(image_A, image_B), wrapped.register(image_A, image_B).grid((16, 8, 12)))
        # 6 ensemble evaluations (the two passes of each direction of the forward, and of register), each of
        # 3 orientations x 2 directions of the 2 pairs
        assert calls == ([12] * 6 if batched else [2] * 36), calls
    for got, want in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(got.grid((16, 8, 12)), want.grid((16, 8, 12)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=1e-4)
    one_way = ensemble_network(block, symmetric=False, flip_axes=[0])
    calls.clear()
    with torch.no_grad():
        one_way.register(image_A, image_B)
    assert calls == [4], calls  # two orientations, one direction
    block.train()
    calls.clear()
    with torch.no_grad():
        ensemble_network(block, symmetric=True, flip_axes=[0]).register(image_A, image_B)
    assert calls == [2, 2, 2, 2], calls
    with pytest.raises(ValueError, match="batch_estimates"):
        TestTimeEnsemble(block, batch_estimates=1)


def test_passes_correct_what_the_first_pass_leaves():
    """A block that recovers half of a translation: each further pass (on the moving image warped by the maps so
    far) halves the remaining error; the composed map of three passes is within an eighth of it (up to the blob's
    resampling), and a block that is already exact is left as it is."""
    image_A, image_B = _blob_pair((24, 12, 10))
    shape = image_A.shape[2:]
    exact = _Translation()(image_A, image_B).grid(shape)
    errors = []
    for passes in (1, 2, 3):
        net = ensemble_network(_Translation(gain=0.5), symmetric=False, passes=passes)
        errors.append(float((net.register(image_A, image_B).grid(shape) - exact).abs().max()))
    assert errors[0] > 0.04 and 0.4 < errors[1] / errors[0] < 0.6 and 0.4 < errors[2] / errors[1] < 0.6, errors
    exact_net = ensemble_network(_Translation(), symmetric=True, flip_axes=[0], passes=2)
    torch.testing.assert_close(exact_net.register(image_A, image_B).grid(shape), exact, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="passes"):
        ensemble_network(_Translation(), passes=0)
    plain = RegistrationNet(_Translation())
    assert ensemble_network(plain, symmetric=False, flip_axes=[], passes=1) is plain  # nothing requested


def test_ensemble_refuses_bad_options():
    with pytest.raises(ValueError, match="flip_axes"):
        TestTimeEnsemble(_Translation(), flip_axes=(0, 0))
    with pytest.raises(ValueError, match="symmetric"):
        TestTimeEnsemble(_Translation(), symmetric="yes")
    with pytest.raises(ValueError, match="inverse_iterations"):
        TestTimeEnsemble(_Translation(), inverse_iterations=0)
    image_A, image_B = _blob_pair()
    with pytest.raises(ValueError, match="spatial axes of 3D"):
        TestTimeEnsemble(_Translation(), flip_axes=(3,))(image_A, image_B)
    with pytest.raises(ValueError, match="RegistrationNet or a RegistrationModule"):
        ensemble_network(torch.nn.Conv3d(2, 3, 1))


def test_flip_passes_mirror_the_images_in_the_first_passes_only():
    """``flip_passes=1``: the first pass registers the pair and its reflections, the later ones the pair alone (one
    batched call of 3 orientations x 2 directions, then of 2 directions); passes are composed on the ensemble's grid
    into one displacement field, and with a block that is already exact the result is the exact map."""
    torch.manual_seed(0)
    network = multistep_registration(coarse_steps=2, coarse_factor=2, encoder_channels=(4, 8),
                                     decoder_channels=(8, 4), resample_coarse=True).eval()
    block, calls = _counted(network.block)
    image_A, image_B = (torch.rand(1, 1, 16, 8, 12) for _ in range(2))
    with torch.no_grad():
        ensemble = ensemble_network(block, symmetric=True, flip_axes=[0, 2], passes=3, flip_passes=1)
        phi = ensemble.register(image_A, image_B)
    assert calls == [6, 2, 2], calls
    assert isinstance(phi, DisplacementMap)
    for flip_passes, expected in ((0, [2, 2]), (2, [6, 6]), (5, [6, 6]), (None, [6, 6])):
        calls.clear()
        with torch.no_grad():
            ensemble_network(block, symmetric=True, flip_axes=[0, 2], passes=2,
                             flip_passes=flip_passes).register(image_A, image_B)
        assert calls == expected, (flip_passes, calls)
    image_A, image_B = _blob_pair((24, 12, 10))
    shape = image_A.shape[2:]
    exact = _Translation()(image_A, image_B).grid(shape)
    net = ensemble_network(_Translation(), symmetric=True, flip_axes=[0], passes=2, flip_passes=1)
    torch.testing.assert_close(net.register(image_A, image_B).grid(shape), exact, atol=2e-3, rtol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="flip_passes"):
            ensemble_network(_Translation(), flip_axes=[0], passes=2, flip_passes=bad)


def test_two_step_resampled_is_its_composition_on_the_first_maps_grid():
    """``TwoStep(resample=True)``: one displacement field on the grid of the first step's field, equal to the exact
    composition at those grid points and within 10 % of its displacement between them (smooth maps); ``resample``
    must be a bool."""
    from monai_icon.networks.blocks import TwoStep

    class _Field(RegistrationModule):
        def __init__(self, seed):
            super().__init__()
            self.field = _smooth_displacement((16, 12, 14), 0.04, seed=seed).float()

        def compute_map(self, image_A, image_B):
            return DisplacementMap(self.field.expand(image_A.shape[0], *self.field.shape[1:]))

    image_A, image_B = torch.rand(2, 1, 12, 10, 14), torch.rand(2, 1, 12, 10, 14)
    exact = TwoStep(_Field(1), _Field(2))(image_A, image_B)
    sampled = TwoStep(_Field(1), _Field(2), resample=True)(image_A, image_B)
    assert isinstance(sampled, DisplacementMap) and tuple(sampled.displacement.shape) == (2, 3, 16, 12, 14)
    torch.testing.assert_close(sampled.grid((16, 12, 14)), exact.grid((16, 12, 14)))
    points = torch.rand(2, 3, 200)
    moved = float((exact(points) - points).abs().max())
    assert float((sampled(points) - exact(points)).abs().max()) < 0.1 * moved, moved
    with pytest.raises(ValueError, match="resample"):
        TwoStep(_Field(1), _Field(2), resample="yes")
