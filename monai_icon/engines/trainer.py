# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""``ICONTrainer``: a MONAI ``SupervisedTrainer`` for pairwise, inverse-consistent registration."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.transforms import Transform
from torch.optim import Optimizer

from monai_icon.backend import CPUBackend, ResolvedBackend, as_backend, use_backend
from monai_icon.engines.keys import RegKeys
from monai_icon.engines.prepare_batch import PrepareRegistrationBatch
from monai_icon.losses.icon import ICONLoss
from monai_icon.losses.map_supervision import MapSupervisionLoss
from monai_icon.networks.maps import map_grid_to_ddf
from monai_icon.networks.registration_net import register_pair
from monai_icon.precision import resolve_cpu_amp
from monai_icon.transforms.self_pair import TARGET_MAP, TARGET_WEIGHT

__all__ = ["ICONTrainer", "MAP_ERROR", "channels_last_copy", "known_maps", "to_channels_last", "trainer_backend"]


def batch_masks(batchdata: dict[str, Any], like: torch.Tensor, device: Any = None,
                non_blocking: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The batch's ``(moving_mask, fixed_mask)`` as float tensors on ``like``'s grid, or ``(None, None)``.

    Raises:
        ValueError: only one of the two masks, or masks not shaped ``[B, 1, *N]`` like the images.
    """
    keys = (RegKeys.MOVING_MASK, RegKeys.FIXED_MASK)
    present = [k in batchdata for k in keys]
    if not any(present):
        return None, None
    if not all(present):
        raise ValueError(f"the batch has only one of {keys}: give masks for both images or neither.")
    masks = [torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking).float() for k in keys]
    for key, mask in zip(keys, masks):
        if mask.shape[0] != like.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != like.shape[2:]:
            raise ValueError(f"{key} must be [B, 1, *N] like the images {tuple(like.shape)}, got {tuple(mask.shape)}.")
    return masks[0], masks[1]


def batch_to_device(batchdata: dict[str, Any], device: Any = None, non_blocking: bool = False) -> dict[str, Any]:
    """A shallow copy of a batch dictionary with its tensors on ``device`` (other entries as they are)."""
    return {k: v.to(device=device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batchdata.items()}


def channels_last_copy(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in channels-last memory format: ``torch.channels_last`` for ``[B, C, H, W]``,
    ``torch.channels_last_3d`` for ``[B, C, D, H, W]``, unchanged otherwise (same values, same type)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return tensor.contiguous(memory_format=formats[tensor.ndim]) if tensor.ndim in formats else tensor


MAP_ERROR = "map_error"


def known_maps(batchdata: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's known maps ``[B, D, *N]`` (``target_map``) and their weights ``[B]`` (``target_weight``, or
    ``None``) on ``like``'s device and dtype, checked against ``like`` (``phi_AB`` on the images' grid)."""
    if TARGET_MAP not in batchdata:
        raise ValueError(f"map supervision needs known maps in the batch ({TARGET_MAP!r}): put a "
                         "monai_icon.transforms.RandSelfPaird into the trainer's augment.")
    target = torch.as_tensor(batchdata[TARGET_MAP]).to(device=like.device, dtype=like.dtype)
    if target.shape != like.shape:
        raise ValueError(f"the known maps {tuple(target.shape)} do not match phi_AB on the images' grid "
                         f"{tuple(like.shape)}.")
    weight = batchdata.get(TARGET_WEIGHT)
    return target, None if weight is None else torch.as_tensor(weight).to(device=like.device, dtype=like.dtype)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store ``module``'s 4D / 5D parameters and buffers (convolution weights) in channels-last memory format, in
    place: the parameter objects are kept, so an optimiser built before the call still holds them."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.data = channels_last_copy(tensor.data)
    return module


#: the keywords that ICONTrainer took before its ``backend`` (each is one field of the backend)
CPU_OPTIONS = ("channels_last", "fast_sampler", "compiled_lncc")


def trainer_backend(
    backend: CPUBackend | str | None, device: str | torch.device, options: dict[str, Any]
) -> CPUBackend | None:
    """:class:`ICONTrainer`'s CPU backend from its ``backend`` and its earlier keywords ``options``
    (:data:`CPU_OPTIONS`): ``backend`` itself (a mode string as a :class:`~monai_icon.backend.CPUBackend`); with
    ``backend=None``, ``None`` (the settings around the trainer, by default the samplers that need no compilation)
    or, when an earlier keyword is ``True``, those defaults (:data:`~monai_icon.backend.DEFAULT`) with the keywords that
    are ``True`` on.

    Raises:
        TypeError: a keyword other than :data:`CPU_OPTIONS`, or one that is not a bool.
        ValueError: a keyword that disagrees with ``backend`` on ``device``.
    """
    unknown = sorted(set(options) - set(CPU_OPTIONS))
    if unknown:
        raise TypeError(f"ICONTrainer got unexpected keyword arguments {unknown}.")
    for name, value in options.items():
        if not isinstance(value, bool):  # a string "false" would be true
            raise TypeError(f"{name} must be a bool, got {value!r} (monai_icon.config.as_bool reads strings).")
    if backend is None:
        if not any(options.values()):
            return None
        return CPUBackend("off", planar_sampler=True, threaded_sampler=True, matrix_resize=True,
                          fused_unet_head=True, selection_quantiles=True, **options)
    backend = as_backend(backend)
    resolved = backend.resolve(device)
    conflicts = [f"{name}={value}" for name, value in options.items() if getattr(resolved, name) != value]
    if conflicts:
        raise ValueError(f"backend={backend} on {torch.device(device)} disagrees with {', '.join(conflicts)}: give "
                         "the CPU optimisations in the backend alone (e.g. CPUBackend('auto', fast_sampler=False)).")
    return backend


class ICONTrainer(SupervisedTrainer):
    """Train a registration network with :class:`~monai_icon.losses.ICONLoss`.

    Each iteration registers every pair both ways (``phi_AB``, ``phi_BA``), applies the loss and steps the
    optimiser. ``engine.state.output`` holds (before decollation; per pair after it): ``loss`` (the
    back-propagated total), ``similarity``, ``inverse_consistency``, ``lmbda`` (scalars), ``folds`` (``[B]``,
    count of ``phi_AB``), ``pred`` (warped moving image), ``ddf`` (MONAI voxel DDF of ``phi_AB``) and the
    input images (keys in :class:`~monai_icon.engines.keys.RegKeys`). The MONAI events ``FORWARD_COMPLETED``,
    ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED`` and ``MODEL_COMPLETED`` fire as in ``SupervisedTrainer``, so
    decollation, ``postprocessing``, metrics and handlers work unchanged.

    Args:
        network: a :class:`~monai_icon.networks.RegistrationNet` (or a registration block), possibly wrapped in
            ``DistributedDataParallel``.
        loss_function: an :class:`~monai_icon.losses.ICONLoss` (its ``lmbda`` may be changed by handlers). With its
            ``label_weight > 0`` the batches must carry ``moving_label`` / ``fixed_label`` (label-supervised
            training: the labels enter the loss only, never the network).
        prepare_batch: defaults to :class:`~monai_icon.engines.PrepareRegistrationBatch`.
        amp: mixed precision on CUDA devices (ignored with a warning-free fallback on CPU).
        cpu_amp: on a CPU device, run the network's forward pass under ``torch.autocast("cpu", torch.bfloat16)``
            (the loss stays float32: :class:`~monai_icon.losses.ICONLoss` turns autocast off inside); ``"auto"``:
            only where the CPU has AMX tiles (:func:`monai_icon.precision.cpu_bfloat16_fast`), whose bfloat16 matrix
            units make steps faster; elsewhere bfloat16 convolutions are slower than float32
            (``docs/benchmarks.md``). Ignored on other devices. Default ``False``.
        compile: ``torch.compile`` the network and the loss function in place (``nn.Module.compile``, so
            attributes such as the loss's ``lmbda`` stay settable by handlers and state-dict keys are unchanged);
            MetaTensor inputs are passed on as plain tensors. The loss compiles into a single graph; a changing
            ``lmbda`` costs one recompilation, not one per value. Inside compiled code the finiteness check of the
            inputs is skipped. See ``docs/benchmarks.md`` for when it pays off.
        compile_kwargs: arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
        mask_inputs: when batches carry ``moving_mask`` / ``fixed_mask`` (``[B, 1, *N]``, e.g. from a datalist's mask
            files through ``RandomPairDataset(keys=("image", "mask"))``), the similarity is always restricted to
            them (loss masking); with ``mask_inputs`` the images are also zeroed outside them before the network.
        augment: a transform of the whole batch dictionary applied at the start of every iteration, after the
            batch's tensors are moved to ``device`` (e.g. :class:`~monai_icon.transforms.RandBatchAugmentd`: a random
            affine per image, drawn and applied on the device for the whole batch at once). Masks and labels must be
            its followers if the batch carries them. Labels reach it only when the loss reads them
            (``label_weight > 0``); otherwise they are left out of the augmented batch, which the training step
            uses for nothing else (``engine.state.batch`` keeps them).
        map_supervision: a :class:`~monai_icon.losses.MapSupervisionLoss`: the batches (after ``augment``) must carry
            known maps ``target_map`` ``[B, D, *N]`` and weights ``target_weight`` ``[B]``
            (:class:`~monai_icon.transforms.RandSelfPaird` in ``augment``), and ``map_supervision_weight`` times its
            value on ``phi_AB`` (on the images' grid) is added to the ICON loss. ``None``: the ICON loss alone.
        map_supervision_weight: its weight (>= 0; handlers may change ``engine.map_supervision_weight``).
        backend: the CPU optimisations (:class:`monai_icon.backend.CPUBackend` or its mode ``"auto"`` / ``"on"`` /
            ``"off"``; same results up to float rounding, faster CPU steps: ``docs/benchmarks.md``), resolved on
            ``device`` (all off unless it is the CPU); each iteration runs inside
            :func:`monai_icon.backend.use_backend`. ``"auto"`` on a CPU: channels-last weights and images, the
            planar and threaded samplers, glibc's allocator tuned, and, with a C++ compiler, the compiled sampler
            and LNCC (compiled at the first iteration, once per image size). ``None`` (default): the settings
            around the trainer (outside any ``use_backend``: the samplers that need no compilation).
        cpu_options: the earlier keywords ``channels_last``, ``fast_sampler`` and ``compiled_lncc`` (bools), still
            accepted: each turns on that optimisation of the backend (with ``backend=None``: on top of the
            defaults); with a ``backend`` they must agree with it on ``device`` (``ValueError`` otherwise).
        Other arguments: as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: ICONLoss,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = PrepareRegistrationBatch(),
        iteration_update: Callable | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        cpu_amp: bool | str = False,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        mask_inputs: bool = False,
        augment: Callable | None = None,
        map_supervision: MapSupervisionLoss | None = None,
        map_supervision_weight: float = 1.0,
        backend: CPUBackend | str | None = None,
        **cpu_options: bool,
    ) -> None:
        if not isinstance(loss_function, ICONLoss):
            raise ValueError(f"loss_function must be a monai_icon.losses.ICONLoss, got {type(loss_function).__name__}.")
        if not isinstance(compile, bool):  # a string "false" would be true
            raise TypeError(f"compile must be a bool, got {compile!r} (monai_icon.config.as_bool reads strings).")
        self.backend = trainer_backend(backend, device, cpu_options)
        self.cpu_settings: ResolvedBackend | None = None if self.backend is None else self.backend.resolve(device)
        channels_last = self.cpu_settings is not None and self.cpu_settings.channels_last
        if channels_last:
            to_channels_last(network)
        if compile:
            network.compile(**(compile_kwargs or {}))
            loss_function.compile(**(compile_kwargs or {}))
        extra: dict[str, Any] = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            additional_metrics=additional_metrics,
            train_handlers=train_handlers,
            amp=amp and torch.device(device).type == "cuda",
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            **extra,
        )
        self.compile = compile
        self.channels_last = channels_last
        self.cpu_amp = resolve_cpu_amp(cpu_amp) and torch.device(device).type == "cpu"  # the value checked anywhere
        self.mask_inputs = bool(mask_inputs)
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable batch transform, got {type(augment).__name__}.")
        self.augment = augment
        if map_supervision is not None and not isinstance(map_supervision, MapSupervisionLoss):
            raise TypeError(f"map_supervision must be a monai_icon.losses.MapSupervisionLoss, got "
                            f"{type(map_supervision).__name__}.")
        if not map_supervision_weight >= 0:
            raise ValueError(f"map_supervision_weight must be >= 0, got {map_supervision_weight}.")
        self.map_supervision = map_supervision
        self.map_supervision_weight = float(map_supervision_weight)

    def _iteration(self, engine: ICONTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        settings = engine.cpu_settings
        with contextlib.nullcontext() if settings is None else use_backend(settings):
            return self._step(engine, batchdata)

    def _step(self, engine: ICONTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        loss_function = cast(ICONLoss, engine.loss_function)  # an ICONLoss, or torch.compile's wrapper of one
        supervised = getattr(loss_function, "label_weight", 0.0) > 0
        if engine.augment is not None:
            # labels that neither the loss nor the augmentation reads are not resampled (two warps of full images)
            if not supervised and not _reads_labels(engine.augment):
                unused = _label_keys(engine.prepare_batch)
                batchdata = {k: v for k, v in batchdata.items() if k not in unused}
            followed = set(getattr(engine.augment, "follow", {}))
            unfollowed = [k for k in (RegKeys.MOVING_MASK, RegKeys.FIXED_MASK) if k in batchdata and k not in followed]
            if unfollowed:
                raise ValueError(f"the batch carries {unfollowed} but the augmentation does not move them with their "
                                 f"images (give follow={{mask key: image key}}).")
            batchdata = engine.augment(batch_to_device(batchdata, engine.state.device, engine.non_blocking))
        moving, fixed, moving_label, fixed_label = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        if supervised and (moving_label is None or fixed_label is None):
            raise ValueError("the loss has label_weight > 0 but the batch carries no moving/fixed labels.")
        labels = (moving_label, fixed_label) if supervised else (None, None)
        masks = batch_masks(batchdata, moving, engine.state.device, engine.non_blocking)
        if masks[0] is not None and engine.mask_inputs:
            moving, fixed = moving * masks[0], fixed * masks[1]
        # plain tensors from here on: every operation on a MetaTensor goes through its Python __torch_function__ and
        # copies its metadata (a measurable share of a 3D CPU step); torch.compile rejects the subclass too
        # (pytorch/pytorch#117026). Nothing after this point reads the metadata.
        moving, fixed = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (moving, fixed))
        if engine.channels_last:
            moving, fixed = (channels_last_copy(x) for x in (moving, fixed))
        engine.state.output = {RegKeys.MOVING: moving, RegKeys.FIXED: fixed}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if engine.cpu_amp
                    else torch.autocast("cuda", enabled=scaler is not None, **engine.amp_kwargs))
        with autocast:
            phi_AB, phi_BA = register_pair(engine.network, moving, fixed)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            result = loss_function(moving, fixed, phi_AB, phi_BA, *labels, *masks)
            total = result.loss
            if engine.map_supervision is not None:
                target, weight = known_maps(batchdata, result.phi_AB_grid)
                map_error = engine.map_supervision(result.phi_AB_grid, target, weight)
                total = total + engine.map_supervision_weight * map_error
                engine.state.output[MAP_ERROR] = map_error.detach()
        engine.state.output.update(
            {
                RegKeys.LOSS: total,
                RegKeys.SIMILARITY: result.similarity.detach(),
                RegKeys.INVERSE_CONSISTENCY: result.inverse_consistency.detach(),
                RegKeys.FOLDS: result.folds,
                RegKeys.LMBDA: torch.tensor(loss_function.lmbda),
                RegKeys.PRED: result.warped_A.detach(),
                RegKeys.DDF: map_grid_to_ddf(result.phi_AB_grid.detach()),
            }
        )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if scaler is not None:
            scaler.scale(total).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            total.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _reads_labels(augment: Any) -> bool:
    """Whether a batch augmentation (or any transform of a MONAI ``Compose`` of them) reads the label maps, as
    :class:`~monai_icon.transforms.RandLabelSynthesisd` does (class attribute ``reads_labels``)."""
    parts = getattr(augment, "transforms", None)
    if isinstance(parts, (list, tuple)):
        return any(_reads_labels(t) for t in parts)
    return bool(getattr(augment, "reads_labels", False))


def _label_keys(prepare_batch: Any) -> tuple[str, str]:
    """The moving / fixed label keys that ``prepare_batch`` reads (the defaults for other callables)."""
    if isinstance(prepare_batch, PrepareRegistrationBatch):
        return prepare_batch.keys[2], prepare_batch.keys[3]
    return RegKeys.MOVING_LABEL, RegKeys.FIXED_LABEL
