# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Training images synthesised from label maps, on whole batches and on the batch's device.

A registration network trained on the images of a few subjects learns their contrast and field of view. Following
SynthMorph (Hoffmann et al., IEEE TMI 2022), :class:`RandLabelSynthesisd` replaces a pair's images, with some
probability, by images drawn from their label maps: every label gets a random intensity (the same table for both
images of a pair, so that a local-correlation similarity stays meaningful), plus Gaussian noise, an optional
partial-volume blur and a smooth multiplicative bias field per image. With another probability the pair's label map
is replaced by random shapes (the arg-max of smooth random noise channels, the same map for both images), so the
network also learns to register structure it has never seen; the spatial augmentation applied after this transform
(:class:`~monai_icon.transforms.RandBatchAugmentd`) deforms the two images independently. Random labels can be set
to zero intensity in both images (as skull stripping removes tissue), and every image, synthesised or real, gets
its own bias field.

All functions take and return channel-first tensors ``[B, C, *spatial]`` (2D or 3D).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_icon.networks.maps import resize_linear

__all__ = ["smooth_noise", "random_bias_field", "random_shapes", "synthesise_from_labels", "RandLabelSynthesisd"]


def smooth_noise(batch: int, channels: int, spatial_size: Sequence[int], control_points: int,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal values on a ``control_points``-per-axis lattice, linearly upsampled (corners aligned) to
    ``[batch, channels, *spatial_size]`` (float32)."""
    if control_points < 2:
        raise ValueError(f"control_points must be >= 2 per axis, got {control_points}.")
    coarse = torch.randn(batch, channels, *([control_points] * len(spatial_size)), generator=generator)
    return resize_linear(coarse.to(device), tuple(int(s) for s in spatial_size))


def random_bias_field(batch: int, spatial_size: Sequence[int], strength: float, control_points: int = 4,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Smooth multiplicative fields ``exp(s * n)`` ``[batch, 1, *spatial_size]``: ``n`` :func:`smooth_noise`,
    ``s`` uniform in ``[0, strength]`` per sample (0: all ones)."""
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"bias strength must be a finite value >= 0, got {strength}.")
    scale = torch.rand(batch, generator=generator) * strength
    noise = smooth_noise(batch, 1, spatial_size, control_points, generator, device)
    return torch.exp(noise * scale.to(noise.device).reshape(batch, *([1] * (noise.ndim - 1))))


def random_shapes(batch: int, spatial_size: Sequence[int], num_labels: int = 16, control_points: int = 8,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Random label maps ``[batch, 1, *spatial_size]`` (int64, labels ``0 .. num_labels - 1``): at every voxel the
    arg-max of ``num_labels`` :func:`smooth_noise` channels (SynthMorph's label maps without anatomy)."""
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}.")
    return smooth_noise(batch, num_labels, spatial_size, control_points, generator, device).argmax(1, keepdim=True)


def synthesise_from_labels(labels: torch.Tensor, intensities: torch.Tensor, noise_std: torch.Tensor | float = 0.0,
                           blur: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images ``[B, 1, *spatial]`` in ``[0, 1]`` from integer label maps ``[B, 1, *spatial]``.

    Args:
        labels: label values ``0 .. L - 1`` (any integer or integral float dtype).
        intensities: ``[B, L]`` intensity of every label in every sample.
        noise_std: standard deviation of added Gaussian noise (a float or ``[B]``), before rescaling.
        blur: average over each voxel's 3-voxel neighbourhood (partial-volume effect) before the noise.
        generator: for the noise.

    Returns:
        float32 images rescaled to ``[0, 1]`` per sample (min-max).
    """
    index = labels.long()
    if index.ndim < 4 or index.shape[1] != 1:
        raise ValueError(f"labels must be [B, 1, *spatial], got shape {tuple(labels.shape)}.")
    batch, num = intensities.shape
    if batch != index.shape[0]:
        raise ValueError(f"intensities are for {batch} samples but the labels for {index.shape[0]}.")
    if int(index.min()) < 0 or int(index.max()) >= num:
        raise ValueError(f"labels must lie in 0..{num - 1} (one intensity each), got {int(index.min())}.."
                         f"{int(index.max())}.")
    table = intensities.to(device=index.device, dtype=torch.float32)
    image = torch.gather(table, 1, index.flatten(1)).reshape(index.shape)
    if blur:
        pool = F.avg_pool3d if image.ndim == 5 else F.avg_pool2d
        image = pool(image, 3, stride=1, padding=1, count_include_pad=False)
    std = torch.as_tensor(noise_std, dtype=torch.float32).reshape(-1, *([1] * (image.ndim - 1)))
    if float(std.max()) > 0:
        noise = torch.randn(image.shape, generator=generator).to(image.device)
        image = image + noise * std.to(image.device)
    return _rescale(image)


def _rescale(image: torch.Tensor) -> torch.Tensor:
    """Min-max rescaling of every sample to [0, 1] (constant samples become zeros)."""
    flat = image.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    shape = (-1, *([1] * (image.ndim - 1)))
    return (image - low.reshape(shape)) / (high - low).clamp_min(1e-6).reshape(shape)


class RandLabelSynthesisd(MapTransform):
    """Replace a **batch**'s image pairs by images synthesised from their label maps (module docstring).

    For every pair of the batch: with probability ``shapes_prob`` its label maps become one random-shapes map
    (:func:`random_shapes`, used for both images); with probability ``prob`` (always for a shapes pair) both
    images are synthesised from their labels with one random intensity table (``shared_prob``: the probability
    that the two images share it; otherwise each draws its own), noise of standard deviation uniform in
    ``[0, noise]`` and a partial-volume blur with probability one half; with probability ``drop_prob`` per label
    (not in shapes pairs), a label is given zero intensity in both images. Then every image gets its own
    :func:`random_bias_field` of strength up to ``bias`` and is rescaled to ``[0, 1]``.

    Args:
        keys: the moving and fixed image keys, ``[B, 1, *spatial]``, intensities in ``[0, 1]``.
        label_keys: their label keys (same shapes, integer labels ``>= 0``).
        prob, shapes_prob, shared_prob, drop_prob: probabilities in ``[0, 1]`` (see above).
        num_shapes, shape_points: labels and lattice points per axis of the random shapes.
        noise: largest noise standard deviation (intensities in ``[0, 1]``).
        bias: largest bias-field strength (log scale; 0: none), ``bias_points`` lattice points per axis.
        keep_labels: keep the label keys in the returned batch (replaced by the shapes maps where drawn); ``False``
            removes them (nothing after this transform reads them unless the loss is label-supervised).
        seed: seed of the transform's own generator.

    Raises:
        KeyError / ValueError: missing keys, shapes that differ, probabilities out of range.
    """

    reads_labels = True

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: Sequence[str] = ("moving_label", "fixed_label"),
        prob: float = 0.5,
        shapes_prob: float = 0.0,
        shared_prob: float = 1.0,
        drop_prob: float = 0.0,
        num_shapes: int = 16,
        shape_points: int = 8,
        noise: float = 0.05,
        bias: float = 0.3,
        bias_points: int = 4,
        keep_labels: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2 or len(label_keys) != 2:
            raise ValueError(f"need two image keys and two label keys (moving, fixed), got {self.keys} and "
                             f"{tuple(label_keys)}.")
        for name, value in (("prob", prob), ("shapes_prob", shapes_prob), ("shared_prob", shared_prob),
                            ("drop_prob", drop_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        for name, value in (("noise", noise), ("bias", bias)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite value >= 0, got {value}.")
        if num_shapes < 2 or shape_points < 2 or bias_points < 2:
            raise ValueError(f"need num_shapes, shape_points and bias_points >= 2, got {num_shapes}, "
                             f"{shape_points} and {bias_points}.")
        self.label_keys = tuple(label_keys)
        self.prob, self.shapes_prob, self.shared_prob, self.drop_prob = prob, shapes_prob, shared_prob, drop_prob
        self.num_shapes, self.shape_points, self.noise = num_shapes, shape_points, noise
        self.bias, self.bias_points, self.keep_labels = bias, bias_points, keep_labels
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def _uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        missing = [k for k in (*self.keys, *self.label_keys) if k not in d]
        if missing:
            raise KeyError(f"label synthesis needs {missing} in the batch (load the labels of the training items).")
        images = [torch.as_tensor(d[k]) for k in self.keys]
        labels = [torch.as_tensor(d[k]) for k in self.label_keys]
        shape = tuple(images[0].shape)
        if any(tuple(t.shape) != shape for t in (*images, *labels)) or len(shape) not in (4, 5) or shape[1] != 1:
            raise ValueError(f"images and labels must all be [B, 1, *spatial] of one shape, got "
                             f"{[tuple(t.shape) for t in (*images, *labels)]}.")
        if any(not torch.isfinite(t).all() or float(t.min()) < 0 for t in labels):
            raise ValueError("label maps must hold finite integer labels >= 0.")
        batch, size, device = shape[0], shape[2:], images[0].device
        out = [x.float().clone() for x in images]
        out_labels = [lab.long() for lab in labels]
        shapes = self._uniform(batch) < self.shapes_prob
        synth = (self._uniform(batch) < self.prob) | shapes
        if bool(shapes.any()):
            drawn = random_shapes(int(shapes.sum()), size, self.num_shapes, self.shape_points, self.generator, device)
            for side in range(2):
                out_labels[side] = out_labels[side].clone()
                out_labels[side][shapes.to(device)] = drawn
        for b in torch.nonzero(synth).flatten().tolist():
            pair = [lab[b:b + 1] for lab in out_labels]
            count = max(int(pair[0].max()), int(pair[1].max())) + 1
            table = self._uniform(1, count)
            tables = [table, table if float(self._uniform(1)) < self.shared_prob else self._uniform(1, count)]
            if not bool(shapes[b]) and self.drop_prob > 0:
                dropped = self._uniform(count) < self.drop_prob
                tables = [t.masked_fill(dropped[None], 0.0) for t in tables]
            for side in range(2):
                std = float(self._uniform(1)) * self.noise
                out[side][b:b + 1] = synthesise_from_labels(pair[side], tables[side], std,
                                                            bool(self._uniform(1) < 0.5), self.generator)
        if self.bias > 0:
            for side in range(2):
                field = random_bias_field(batch, size, self.bias, self.bias_points, self.generator, device)
                out[side] = _rescale(out[side] * field)
        for side, key in enumerate(self.keys):
            d[key] = out[side].to(images[side].dtype)
        for side, key in enumerate(self.label_keys):
            if self.keep_labels:
                d[key] = out_labels[side].to(labels[side].dtype)
            else:
                d.pop(key)
        return d
