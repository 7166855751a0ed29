# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Register image files with a trained model in physical space: the Python API behind ``monai-icon register``.

:func:`register_images` registers two channel-first MetaTensors (with their affines) with a
:class:`~monai_icon.apps.model_files.RegistrationModel` (model files: :mod:`monai_icon.apps.model_files`), optionally
refined on the pair (instance optimisation); :func:`register_files` does it for image files and writes the results
on the fixed image's own grid. Lists of pairs: :mod:`monai_icon.apps.batch`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor

from monai_icon.apps.model_files import (
    MODEL_FORMAT,
    RegistrationModel,
    load_registration_model,
    save_registration_model,
)
from monai_icon.apps.physical import (
    check_memory,
    fixed_to_moving_world,
    label_dtype,
    load_image,
    sample_labels,
    sample_world,
    unit_to_world,
    world_points,
    write_displacement,
    write_image,
)
from monai_icon.apps.files import (
    OUTPUT_KEYWORDS,
    PAIR_KEYWORDS,
    REFINEMENT_KEYWORDS,
    OutputFiles,
    PairFiles,
    refinement_from_keywords,
    split_keywords,
)
from monai_icon.apps.validation import (
    check_device,
    check_finite,
    check_image_geometry,
    check_label_values,
    check_registration_arguments,
)
from monai_icon.losses.icon import ICONLoss
from monai_icon.metrics.folds import count_folds
from monai_icon.engines.instance_optimisation import (
    Refinement,
    instance_optimise,
    refine_one_way,
    residual_instance_optimise,
    restored_weights,
)
from monai_icon.networks.maps import Map
from monai_icon.networks.nets.unet import unet_padding
from monai_icon.networks.registration_net import register_one_way
from monai_icon.transforms.laterality import side_from_filename
from monai_icon.transforms.network_grid import isotropic_grid

__all__ = [
    "MODEL_FORMAT",
    "RegistrationModel",
    "save_registration_model",
    "load_registration_model",
    "restored_weights",
    "instance_optimise",
    "PhysicalRegistration",
    "register_images",
    "register_files",
    "PairFiles",
    "OutputFiles",
]

_DEFAULT = Refinement()  # the default of each instance-optimisation setting


@dataclass
class PhysicalRegistration:
    """The result of :func:`register_images`: ``phi`` in network coordinates and the two ``[0, 1]``-to-world
    matrices, enough to evaluate the world transform anywhere (:meth:`fixed_to_moving`)."""

    phi: Map
    fixed_unit_to_world: np.ndarray
    moving_unit_to_world: np.ndarray
    io_losses: list[float]
    seconds: float
    grid_size: tuple[int, ...] | None = None  # the grid ``phi`` was computed on (its folds are counted there)

    def fixed_to_moving(self, fixed_affine: np.ndarray, fixed_shape: Sequence[int]) -> torch.Tensor:
        """Moving world points (RAS mm) ``[3, *fixed_shape]`` of the voxel centres of a fixed grid."""
        return fixed_to_moving_world(
            self.phi, fixed_affine, fixed_shape, self.fixed_unit_to_world, self.moving_unit_to_world
        )


def register_images(
    model: RegistrationModel, fixed: MetaTensor, moving: MetaTensor, fixed_side: str | None = None,
    moving_side: str | None = None, io_steps: int = _DEFAULT.steps, io_lr: float | None = _DEFAULT.lr,
    device: str | torch.device | None = None,
    io_mode: str = _DEFAULT.mode, io_size: Sequence[int] | None = _DEFAULT.size,
    fixed_mask: MetaTensor | None = None, moving_mask: MetaTensor | None = None,
    fixed_label: MetaTensor | None = None, moving_label: MetaTensor | None = None, label_weight: float = 0.0,
    io_levels: int = _DEFAULT.levels, io_field_size: Sequence[int] | None = _DEFAULT.field_size,
    io_fine_steps: int | None = _DEFAULT.fine_steps, refinement: Refinement | None = None,
) -> PhysicalRegistration:
    """Register two channel-first MetaTensors (with affines) in physical space.

    Each image is brought to the model's grid (:attr:`RegistrationModel.grid`); with ``io_steps > 0`` instance
    optimisation (Adam at ``io_lr``, by default the mode's
    :data:`~monai_icon.engines.instance_optimisation.DEFAULT_IO_LR`: 2e-5 for the network's weights, 2e-3 for
    residual fields) refines the result on this pair: ``io_mode="network"`` fine-tunes the
    network's weights (restored afterwards), ``"residual"`` keeps the network and optimises free residual
    displacement fields on top of its maps
    (:func:`~monai_icon.engines.instance_optimisation.residual_instance_optimise`), on the network grid or, with
    ``io_size``, on a finer grid of the same field of view (e.g. twice the network grid). Masks (both or neither;
    nonzero = inside) zero each image outside its mask before the network (input masking) and restrict the
    similarity of instance optimisation to them (loss masking). With ``label_weight > 0`` and both label maps,
    instance optimisation adds the Dice term of the warped labels (label-supervised instance optimisation).
    ``io_levels > 1`` (residual mode) sums residual fields on that many grids, each half the previous one
    (coarse-to-fine in every step: smooth deformations need far fewer steps). ``io_field_size`` (residual mode):
    the grid of the residual fields and of the regulariser's points when it differs from the grid the images are
    compared on (default: ``io_size``, or the network grid), e.g. images compared at full resolution
    (``io_size``) while the fields stay on the network grid: finer similarity at a fraction of a finer field's cost.
    ``io_fine_steps``: with ``io_size``, only the last this many steps compare the images on ``io_size``, the
    others on the residual fields' grid (the network's inputs, or for a network that takes the finer images
    itself, those average-pooled; default: all steps on ``io_size``).
    ``refinement``: all these ``io_*`` settings as one value (then the ``io_*`` keywords stay at their defaults),
    which also holds those of ``io_mode="one-way"``
    (:func:`~monai_icon.engines.instance_optimisation.refine_one_way`: ``smoothness``) and ``voxels`` (residual modes:
    the images compared on a grid of about that many voxels shaped like the fixed image's field of view, chosen here).

    The settings are checked by :func:`~monai_icon.apps.validation.check_registration_arguments`.
    """
    loose = Refinement(io_steps, io_lr, io_mode, None if io_size is None else tuple(io_size), io_levels,
                       None if io_field_size is None else tuple(io_field_size), io_fine_steps)
    settings = refinement_from_keywords(refinement, **loose.arguments())
    settings = check_registration_arguments(settings, label_weight, model=model, masks=fixed_mask is not None)
    io_steps, io_lr, io_mode, io_levels, io_fine_steps = (settings.steps, cast(float, settings.lr), settings.mode,
                                                          settings.levels, settings.fine_steps)
    io_size, io_field_size = settings.size, settings.field_size
    if settings.voxels is not None and io_size is None and io_field_size is None and io_steps > 0:
        io_size = isotropic_grid(model.grid.field_of_view(fixed), settings.voxels)
        io_field_size = tuple(s // 2 for s in io_size)
    if (fixed_mask is None) != (moving_mask is None):
        raise ValueError("give both masks (fixed and moving) or neither.")
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.ndim - 1 != model.spatial_dims:
            raise ValueError(f"the model registers {model.spatial_dims}D images but the {name} image is "
                             f"{image.ndim - 1}D (shape {tuple(image.shape[1:])}).")
    device = torch.device(device) if device is not None else next(model.network.parameters()).device
    start = time.perf_counter()
    network_size = model.grid.size_for(fixed)  # the model's grid, or one shaped like the fixed image
    grids = [model.grid.apply(img, side, network_size) for img, side in ((fixed, fixed_side), (moving, moving_side))]
    fixed_net, moving_net = (g.as_tensor().unsqueeze(0).to(device) for g in grids)

    def nearest_pair(pair: tuple[MetaTensor | None, MetaTensor | None],
                     size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(moving, fixed)`` masks or label maps resampled (nearest) onto a grid, ``[1, 1, *size]`` each."""
        if pair[0] is None or pair[1] is None:
            return None
        out = [model.grid.apply(m, side, size, labels=True).as_tensor()[:1].unsqueeze(0).to(device)
               for m, side in ((pair[0], moving_side), (pair[1], fixed_side))]
        return out[0], out[1]

    def mask_on(size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        resampled = nearest_pair((moving_mask, fixed_mask), size)
        return None if resampled is None else ((resampled[0] > 0).float(), (resampled[1] > 0).float())

    def labels_on(size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        resampled = nearest_pair((moving_label, fixed_label), size) if label_weight > 0 else None
        return None if resampled is None else (resampled[0].round().long(), resampled[1].round().long())

    def images_on(size: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(moving, fixed)`` images on the grid a refinement compares them on, ``[1, C, *size]`` each."""
        if size is None:
            return None
        fine = [model.grid.apply(img, side, size) for img, side in ((fixed, fixed_side), (moving, moving_side))]
        return fine[1].as_tensor().unsqueeze(0).to(device), fine[0].as_tensor().unsqueeze(0).to(device)

    masks = mask_on(network_size)
    if masks is not None:
        moving_net, fixed_net = moving_net * masks[0], fixed_net * masks[1]
    if fixed_net.shape[1] != moving_net.shape[1]:
        raise ValueError(f"fixed and moving images have {fixed_net.shape[1]} and {moving_net.shape[1]} channels.")
    losses: list[float] = []
    network = model.network.eval()
    if label_weight > 0 and (fixed_label is None or moving_label is None):
        raise ValueError("label_weight > 0 needs both label maps (fixed and moving).")
    num_classes = None
    if label_weight > 0 and fixed_label is not None and moving_label is not None:
        num_classes = int(max(float(fixed_label.max()), float(moving_label.max()))) + 1
    loss = ICONLoss(model.similarity, model.lmbda, model.regularizer, spatial_dims=model.spatial_dims,
                    label_weight=label_weight if num_classes else 0.0, num_classes=num_classes,
                    regularizer_size=None if io_field_size is None else tuple(int(v) for v in io_field_size),
                    compute_folds=False)  # instance optimisation does not read the folds of its steps
    # on a grid shaped like the image the U-Nets pad nothing (by default they pad to multiples of 32, up to twice
    # the voxels): the grid's sizes are already multiples of 16
    with unet_padding(network, 1) if model.isotropic else nullcontext():
        if io_steps > 0 and io_mode == "one-way":
            loss_images = images_on(io_size)
            phi, losses = refine_one_way(network, moving_net, fixed_net, loss.similarity, io_steps, io_lr,
                                         shape=tuple(io_field_size) if io_field_size else None,
                                         loss_images=loss_images,
                                         levels=io_levels, fine_steps=io_fine_steps, smoothness=settings.smoothness)
        elif io_steps > 0 and io_mode == "residual":
            loss_images = images_on(io_size)
            io_masks = mask_on(io_size) if io_size is not None else masks
            if loss_images is not None and io_masks is not None:
                loss_images = (loss_images[0] * io_masks[0], loss_images[1] * io_masks[1])
            io_labels = labels_on(io_size) if io_size is not None else labels_on(network_size)
            phi, _, losses = residual_instance_optimise(network, moving_net, fixed_net, loss, io_steps, io_lr,
                                                        shape=tuple(io_field_size) if io_field_size else None,
                                                        loss_images=loss_images, masks=io_masks, labels=io_labels,
                                                        levels=io_levels, fine_steps=io_fine_steps)
        else:
            with restored_weights(network):
                if io_steps > 0:
                    losses = instance_optimise(network, moving_net, fixed_net, loss, io_steps, io_lr, masks,
                                               labels_on(network_size))
                with torch.no_grad():  # the map holds the network's outputs: unaffected by restoring the weights
                    phi = register_one_way(network, moving_net, fixed_net)
    return PhysicalRegistration(
        phi=phi,
        fixed_unit_to_world=unit_to_world(grids[0].affine, network_size),
        moving_unit_to_world=unit_to_world(grids[1].affine, network_size),
        io_losses=losses,
        seconds=time.perf_counter() - start,
        grid_size=tuple(io_field_size or io_size or network_size) if io_steps > 0 and io_mode != "network"
        else tuple(network_size),
    )


def register_files(
    fixed: str | Path | None = None,
    moving: str | Path | None = None,
    model: RegistrationModel | str | Path | None = None,
    *,
    inputs: PairFiles | None = None,
    outputs: OutputFiles | None = None,
    refinement: Refinement | None = None,
    device: str | torch.device | None = None,
    label_weight: float = 0.0,
    memory_limit_bytes: int | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Register a moving image file to a fixed one and write the results on the fixed image's grid::

        register_files(inputs=PairFiles("F.nii.gz", "M.nii.gz"), model=model,
                       outputs=OutputFiles(warped="W.nii.gz", transform="phi.h5"),
                       refinement=recommended_refinement(model.spatial_size))

    or, with the same meaning, the loose keywords: ``register_files("F.nii.gz", "M.nii.gz", model,
    warped="W.nii.gz", transform="phi.h5", io_steps=36, ...)``.

    Args:
        fixed, moving: image files (NIfTI, MHA, NRRD, ...), any spacing, orientation and size (or ``inputs``).
        model: a :class:`RegistrationModel` or a model file / bundle folder (:func:`load_registration_model`).
        inputs: the pair's files and knee sides as one value (:class:`~monai_icon.apps.files.PairFiles`: ``fixed``,
            ``moving``, ``fixed_label``, ``moving_label``, ``fixed_mask``, ``moving_mask``, ``fixed_side``,
            ``moving_side``).
        outputs: the files to write as one value (:class:`~monai_icon.apps.files.OutputFiles`: ``warped``, ``ddf``,
            ``transform``, ``warped_label``; at least one).
        refinement: the instance-optimisation settings as one value
            (:class:`~monai_icon.engines.instance_optimisation.Refinement`, e.g.
            :func:`monai_icon.apps.presets.recommended_refinement`; default: none, the network alone).
        device: the torch device (default: the model's).
        label_weight: label-supervised instance optimisation: the weight of the Dice term of the warped
            ``moving_label`` against ``fixed_label`` (needs both label maps and instance-optimisation steps).
        memory_limit_bytes: refuse outputs on the fixed grid that need more memory than this (default: the memory
            available).
        keywords: the fields of ``inputs`` (but ``fixed``, ``moving``), ``outputs`` and ``refinement`` as loose
            keywords, as earlier versions took them: ``moving_label``, ``fixed_label``, ``fixed_mask``,
            ``moving_mask``, ``fixed_side``, ``moving_side``; ``warped``, ``ddf``, ``transform``, ``warped_label``;
            ``io_steps``, ``io_lr``, ``io_mode``, ``io_size``, ``io_levels``, ``io_field_size``, ``io_fine_steps``
            (see :func:`register_images`). A value and keywords for the same settings are not mixed.

    Returns:
        a summary: the files written, seconds, instance-optimisation losses, the folds of the final map (% of the
        cells of the network grid, or of the residual fields' grid, with a negative Jacobian determinant) and the mean
        displacement (mm, RAS).

    Raises:
        FileNotFoundError, ValueError: unreadable inputs or model, 2D/3D or channel mismatches, out-of-range
            arguments, sides other than LEFT/RIGHT, an unavailable device, outputs that cannot be written
            (checked before any computation), degenerate geometry, label maps that are not integer-valued; a value
            (``inputs``, ``outputs``, ``refinement``) together with keywords for its settings.
        TypeError: no model, no images, or an unknown keyword.
        MemoryError: outputs on the fixed grid that would not fit in memory.
    """
    pair_keywords, output_keywords, io_keywords = split_keywords("register_files", keywords, PAIR_KEYWORDS,
                                                                 OUTPUT_KEYWORDS, REFINEMENT_KEYWORDS)
    inputs = PairFiles.merge(inputs, fixed=fixed, moving=moving, **pair_keywords)
    outputs = OutputFiles.merge(outputs, **output_keywords)
    if model is None:
        raise TypeError("register_files() needs a model (a RegistrationModel, a model file or a bundle folder).")
    # every argument and output checked before any computation, so a long registration cannot fail at the end
    settings = check_registration_arguments(refinement_from_keywords(refinement, **io_keywords), label_weight,
                                            inputs=inputs, outputs=outputs, model=model)
    device = check_device(device)
    if not isinstance(model, RegistrationModel):
        model = load_registration_model(model, device)
        check_registration_arguments(settings, label_weight, model=model)  # the grids against the model's
    fixed, moving, fixed_label, moving_label = inputs.fixed, inputs.moving, inputs.fixed_label, inputs.moving_label
    fixed_mask, moving_mask, fixed_side, moving_side = (inputs.fixed_mask, inputs.moving_mask, inputs.fixed_side,
                                                        inputs.moving_side)
    warped, ddf, transform, warped_label = outputs.warped, outputs.ddf, outputs.transform, outputs.warped_label
    fixed_image, moving_image = load_image(fixed, "fixed image"), load_image(moving, "moving image")
    label = load_image(moving_label, "moving label") if moving_label is not None else None
    masks = [load_image(m, f"{role} mask") if m is not None else None
             for m, role in ((fixed_mask, "fixed"), (moving_mask, "moving"))]
    for mask, image, role in ((masks[0], fixed_image, "fixed"), (masks[1], moving_image, "moving")):
        if mask is not None and tuple(mask.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(f"the {role} mask's grid {tuple(mask.shape[1:])} differs from the {role} image's "
                             f"{tuple(image.shape[1:])}.")
    for image, name in ((fixed_image, "the fixed image"), (moving_image, "the moving image")):
        check_image_geometry(np.asarray(image.affine), tuple(image.shape[1:]), name, model.spatial_dims)
    if label is not None:
        check_label_values(label.as_tensor(), f"the moving label {moving_label}")
    fixed_labels = load_image(fixed_label, "fixed label") if fixed_label is not None else None
    if fixed_labels is not None:
        check_label_values(fixed_labels.as_tensor(), f"the fixed label {fixed_label}")
        if tuple(fixed_labels.shape[1:]) != tuple(fixed_image.shape[1:]):
            raise ValueError(f"the fixed label's grid {tuple(fixed_labels.shape[1:])} differs from the fixed image's "
                             f"{tuple(fixed_image.shape[1:])}.")
    if fixed_image.ndim != moving_image.ndim:
        raise ValueError(
            f"fixed and moving images differ in dimension: {fixed_image.ndim - 1}D vs {moving_image.ndim - 1}D."
        )
    if label is not None and tuple(label.shape[1:]) != tuple(moving_image.shape[1:]):
        raise ValueError(f"the moving label's grid {tuple(label.shape[1:])} differs from the moving image's "
                         f"{tuple(moving_image.shape[1:])}.")
    fixed_shape = tuple(fixed_image.shape[1:])
    fixed_affine = np.asarray(fixed_image.affine, dtype=np.float64)
    num_classes = len(torch.unique(label.as_tensor())) + 1 if label is not None else 0
    check_memory(int(np.prod(fixed_shape)), 3 + moving_image.shape[0] + num_classes, "the outputs on the fixed grid",
                 memory_limit_bytes)

    if model.target_side is not None:  # one-sided knee model: sides default to LEFT/RIGHT in the file names
        fixed_side = fixed_side or side_from_filename(fixed)
        moving_side = moving_side or side_from_filename(moving)
    result = register_images(model, fixed_image, moving_image, fixed_side, moving_side, device=device,
                             fixed_mask=masks[0], moving_mask=masks[1], fixed_label=fixed_labels, moving_label=label,
                             label_weight=float(label_weight), refinement=settings)
    points = result.fixed_to_moving(fixed_affine, fixed_shape)
    try:
        check_finite(points, "the registration's result")
    except ValueError as err:
        raise ValueError(f"{err} Nothing was written: check the model's weights, the images' intensities and the "
                         "instance-optimisation settings (a learning rate too large diverges).") from None
    moving_affine = np.asarray(moving_image.affine, dtype=np.float64)
    written = {}
    if warped is not None:
        values = sample_world(moving_image.as_tensor(), moving_affine, points)
        written["warped"] = str(
            write_image(
                values[0].numpy() if values.shape[0] == 1 else values.movedim(0, -1).numpy(), fixed_affine, warped,
                "warped image",
            )
        )
    if label is not None and warped_label is not None:  # both or neither (checked above)
        warped_labels = sample_labels(label.as_tensor()[:1], moving_affine, points, memory_limit_bytes)
        written["warped_label"] = str(write_image(warped_labels.to(label_dtype(warped_labels)).numpy(), fixed_affine,
                                                  warped_label, "warped label map"))
    displacement = points - world_points(fixed_affine, fixed_shape)
    if ddf is not None or transform is not None:
        write_displacement(displacement, fixed_affine, ddf, transform)
        written.update({k: str(v) for k, v in (("ddf", ddf), ("transform", transform)) if v is not None})
    with torch.no_grad():  # folds of the final map on the grid it was computed on (the reference's stencil)
        folds = count_folds(result.phi.grid(result.grid_size or model.spatial_size), percentage=True)
    return {
        "written": written,
        "seconds": result.seconds,
        "io_losses": result.io_losses,
        "folds_percent": float(folds.mean()),
        "mean_displacement_mm": displacement.reshape(displacement.shape[0], -1).mean(1).tolist(),
    }


_BATCH = ("RESUME_FOLDER", "PairError", "check_pairs", "pair_id", "pair_outputs", "register_pairs", "score_labels")


def __getattr__(name: str) -> Any:
    """Lists of pairs moved to :mod:`monai_icon.apps.batch` (which imports this module); their names stay importable
    from here."""
    if name in _BATCH:
        from monai_icon.apps import batch

        return getattr(batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
