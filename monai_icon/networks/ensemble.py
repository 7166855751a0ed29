# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Test-time ensembling of a registration block: several estimates of ``phi_AB`` from one network, averaged.

An inverse-consistent network gives two estimates of ``phi_AB`` per pair: its ``phi_AB`` and the inverse of its
``phi_BA``. Images reflected along an axis of (near) mirror symmetry, such as the left-right axis of a head, give
two more: the network's maps of the reflected pair, reflected back. Their errors are partly independent, so their
mean is closer to the true map than any one of them (``docs/results.md``). Applied again to the moving
image warped by the mean map (``passes``), the ensemble corrects what the first pass left. No weights of its own:
a trained block is wrapped at inference (:func:`ensemble_network`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from monai_icon.networks.blocks import RegistrationModule, TwoStep, _child_map, check_image_pair
from monai_icon.networks.maps import DisplacementMap, Map
from monai_icon.networks.registration_net import RegistrationNet

__all__ = ["DEFAULT_INVERSE_ITERATIONS", "DEFAULT_PASSES", "TestTimeEnsemble", "ensemble_network"]

#: passes of :func:`ensemble_network` (and ``monai-icon register --passes``) when none is given: the network once
DEFAULT_PASSES = 1

#: fixed-point iterations of each inverse in :class:`TestTimeEnsemble` when none is given
DEFAULT_INVERSE_ITERATIONS = 3


class TestTimeEnsemble(RegistrationModule):
    """``phi_AB`` averaged over test-time estimates of one registration block.

    The estimates: the block's ``phi_AB``; with ``symmetric``, the inverse of its ``phi_BA``
    (:meth:`~monai_icon.networks.maps.DisplacementMap.inverse`); with ``flip_axes``, the same on the images reflected
    along each of those axes, reflected back (:meth:`~monai_icon.networks.maps.DisplacementMap.flipped`). Their
    displacements are averaged on one grid: the block's own when it returns a
    :class:`~monai_icon.networks.maps.DisplacementMap` (e.g. ``Downsample(resample=True)``: the network's field
    grid), else the images' grid. The result is a ``DisplacementMap`` on that grid.

    Costs ``(1 + len(flip_axes))`` block evaluations per direction, by default in one call on the pairs stacked
    along the batch axis (``batch_estimates``); :meth:`forward_both` reuses them for both directions.

    Args:
        block: a trained registration block (any module ``(image_A, image_B) -> Map``).
        symmetric: add the inverse of the block's map in the other direction.
        flip_axes: spatial axes (array order of the network's grid, ``0 .. D - 1``) to reflect the images along,
            one extra estimate (or two, with ``symmetric``) per axis. Only for axes along which the anatomy is
            close to mirror-symmetric (the left-right axis of brains in RAS order: 0).
        inverse_iterations: fixed-point iterations of each inverse (default 3: the error shrinks by the
            displacement's largest derivative per iteration, well below 1 for a network's smooth maps; on the T1-head
            validation pairs 3, 6, 10 and 20 give the same Dice to 1e-5, on the validation pairs of
            ``benchmarks/generalisation3d.py`` 3 and 6 give 0.7283 and 0.7284 with ``--isotropic-grid
            --ensemble``, 3 costing 9 % less time).
        check_inputs: validate the pair (shapes, finiteness) on ``forward``.
        batch_estimates: evaluate the block once on all the (reflected, swapped) pairs stacked along the batch
            axis instead of once per pair: the same maps (up to rounding) in fewer, larger calls, which use a GPU
            better and, on a CPU, let PyTorch run its oneDNN convolutions where it would use slower ones for a single
            small 3D image (``docs/generalisation.md``: 10-13 % less time for the recommended ensemble);
            ``2 * (1 + len(flip_axes))`` times the block's activation memory. Only in evaluation mode: a block in
            training mode (e.g. batch normalisation with batch statistics) is evaluated once per pair.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        block: nn.Module,
        symmetric: bool = True,
        flip_axes: Sequence[int] = (),
        inverse_iterations: int = DEFAULT_INVERSE_ITERATIONS,
        check_inputs: bool = True,
        batch_estimates: bool = True,
    ) -> None:
        super().__init__(check_inputs)
        if not isinstance(symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {symmetric!r}.")
        flips = [int(a) for a in flip_axes]
        if len(set(flips)) != len(flips) or any(a < 0 for a in flips):
            raise ValueError(f"flip_axes must be distinct non-negative spatial axes, got {list(flip_axes)}.")
        if isinstance(inverse_iterations, bool) or not isinstance(inverse_iterations, int) or inverse_iterations < 1:
            raise ValueError(f"inverse_iterations must be a positive integer, got {inverse_iterations!r}.")
        if not isinstance(batch_estimates, bool):
            raise ValueError(f"batch_estimates must be True or False, got {batch_estimates!r}.")
        self.batch_estimates = batch_estimates
        self.block = block
        self.symmetric = symmetric
        self.flip_axes = tuple(flips)
        self.inverse_iterations = inverse_iterations

    def _sampled(self, phi: Map, image: torch.Tensor) -> DisplacementMap:
        return phi if isinstance(phi, DisplacementMap) else phi.sampled(image.shape[2:])

    def _block_maps(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[DisplacementMap]:
        """The block's map of each ``(image_A, image_B)`` pair (all of one shape), as displacement maps: one block
        evaluation on the pairs stacked along the batch axis (``batch_estimates`` and the block in evaluation mode),
        else one per pair."""
        if not (self.batch_estimates and not self.block.training and len(pairs) > 1):
            return [self._sampled(_child_map(self.block, A, B), A) for A, B in pairs]
        size = pairs[0][0].shape[0]
        stacked_A = torch.cat([A for A, _ in pairs])
        phi = self._sampled(_child_map(self.block, stacked_A, torch.cat([B for _, B in pairs])), stacked_A)
        return [DisplacementMap(d) for d in phi.displacement.split(size)]

    def _inverses(self, maps: list[DisplacementMap]) -> list[DisplacementMap]:
        """The inverse of each map (all on one grid), computed together: the fixed-point iteration acts on each
        batch element on its own."""
        if not maps:
            return []
        size = maps[0].batch_size
        stacked = DisplacementMap(torch.cat([m.displacement for m in maps])).inverse(self.inverse_iterations)
        return [DisplacementMap(d) for d in stacked.displacement.split(size)]

    def _estimates(self, image_A: torch.Tensor, image_B: torch.Tensor, both: bool) -> list[list[DisplacementMap]]:
        """``[[phi_AB estimates], [phi_BA estimates]]`` (the second empty unless ``both``)."""
        spatial_dims = image_A.ndim - 2
        if any(a >= spatial_dims for a in self.flip_axes):
            raise ValueError(f"flip_axes {self.flip_axes} must be spatial axes of {spatial_dims}D images "
                             f"(0 .. {spatial_dims - 1}).")
        orientations: list[tuple[int, ...]] = [()] + [(a,) for a in self.flip_axes]
        flipped = [(image_A.flip([a + 2 for a in axes]), image_B.flip([a + 2 for a in axes])) if axes
                   else (image_A, image_B) for axes in orientations]
        reverse = self.symmetric or both  # the block's phi_BA is needed too
        pairs = flipped + ([(B, A) for A, B in flipped] if reverse else [])
        maps = [m.flipped(orientations[i % len(orientations)]) for i, m in enumerate(self._block_maps(pairs))]
        ab, ba = maps[:len(orientations)], maps[len(orientations):]
        inverses = self._inverses(ba + (ab if both else [])) if self.symmetric else []
        inverse_ba, inverse_ab = inverses[:len(orientations)], inverses[len(orientations):]
        estimates: list[list[DisplacementMap]] = [[], []]
        for i in range(len(orientations)):
            estimates[0] += [ab[i], inverse_ba[i]] if self.symmetric else [ab[i]]
            if both:
                estimates[1] += [ba[i], inverse_ab[i]] if self.symmetric else [ba[i]]
        return estimates

    @staticmethod
    def _mean(estimates: list[DisplacementMap]) -> DisplacementMap:
        shapes = {tuple(e.displacement.shape) for e in estimates}
        if len(shapes) != 1:
            raise ValueError(f"the block's estimates are on different grids {sorted(shapes)}; it must return maps "
                             "on one grid for images of one shape.")
        return DisplacementMap(torch.stack([e.displacement for e in estimates]).mean(0))

    def compute_map(self, image_A: torch.Tensor, image_B: torch.Tensor) -> DisplacementMap:
        return self._mean(self._estimates(image_A, image_B, both=False)[0])

    def forward_both(self, image_A: torch.Tensor, image_B: torch.Tensor) -> tuple[Map, Map]:
        """``(phi_AB, phi_BA)`` from one set of block evaluations."""
        if self.check_inputs:
            check_image_pair(image_A, image_B)
        ab, ba = self._estimates(image_A, image_B, both=True)
        return self._mean(ab), self._mean(ba)


def ensemble_network(
    network: nn.Module, symmetric: bool = True, flip_axes: Sequence[int] = (),
    inverse_iterations: int = DEFAULT_INVERSE_ITERATIONS, passes: int = DEFAULT_PASSES, batch_estimates: bool = True,
    flip_passes: int | None = None,
) -> nn.Module:
    """A :class:`~monai_icon.networks.RegistrationNet` (or a bare registration block) wrapped so that its maps are
    :class:`TestTimeEnsemble` means; the weights are shared with ``network`` (nothing is copied). With nothing
    requested (not ``symmetric``, no ``flip_axes``, one pass) the network is returned as it is (a bare block in a
    ``RegistrationNet``), whatever its type.

    Args:
        network: the trained network.
        symmetric, flip_axes, inverse_iterations, batch_estimates: of :class:`TestTimeEnsemble`.
        passes: with ``passes > 1`` the ensemble is applied again to the moving image warped by the maps so far and
            the maps are composed (:class:`~monai_icon.networks.blocks.TwoStep` with shared weights: ``phi_1 o phi_2
            o ...``), each pass correcting what the previous ones left; ``passes`` times the cost. The composition is
            sampled on the ensemble's grid after each pass (``TwoStep(resample=True)``): the result is one
            displacement field, queried at one interpolation per point however many passes there are (on the
            validation pairs of ``benchmarks/generalisation3d.py``, ``--isotropic-grid --ensemble``: Dice 0.7286
            against 0.7284 composed exactly).
        flip_passes: the images mirrored along ``flip_axes`` in the first ``flip_passes`` passes only (default
            ``None``: in every pass); the later passes, which correct smaller residual misalignments, use the
            block's maps (and with ``symmetric`` their inverses) alone: ``1 + len(flip_axes)`` times fewer block
            evaluations there. On the validation pairs above, ``--ensemble --flip-passes 1`` gives 0.7274
            against 0.7284 in 0.79 of the time (``docs/generalisation.md``).

    Raises:
        ValueError: a network that is neither a ``RegistrationNet`` nor a ``RegistrationModule``, ``passes < 1``,
            or ``flip_passes`` neither ``None`` nor a non-negative integer.
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive integer, got {passes!r}.")
    if flip_passes is not None and (isinstance(flip_passes, bool) or not isinstance(flip_passes, int)
                                    or flip_passes < 0):
        raise ValueError(f"flip_passes must be a non-negative integer or None, got {flip_passes!r}.")
    if not symmetric and not list(flip_axes) and passes == 1:  # nothing to ensemble
        return RegistrationNet(network) if isinstance(network, RegistrationModule) else network
    block = network.block if isinstance(network, RegistrationNet) else network
    if not isinstance(block, RegistrationModule):
        raise ValueError(f"test-time ensembling needs a RegistrationNet or a RegistrationModule, got "
                         f"{type(network).__name__}.")
    flipped = passes if flip_passes is None else min(flip_passes, passes)

    def ensemble(flip: bool) -> RegistrationModule:
        return TestTimeEnsemble(block, symmetric, flip_axes if flip else (), inverse_iterations,
                                batch_estimates=batch_estimates)

    combined = ensemble(flipped > 0)
    for i in range(1, passes):
        combined = TwoStep(combined, ensemble(i < flipped), check_inputs=False, resample=True)
    combined.check_inputs = True
    return RegistrationNet(combined)
