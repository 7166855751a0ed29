# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The CPU backend: the optimisations that make CPU training and registration faster, behind one setting.

PyTorch's CPU kernels leave speed on the table for 3D registration: its 3D ``grid_sample`` is scalar code, the LNCC
is a chain of full-size passes over memory, and glibc returns large freed blocks to the system after every step.
This package holds the replacements (same values up to float rounding) and the one setting that turns them on:

- :class:`CPUBackend` (``mode`` ``"auto"`` / ``"on"`` / ``"off"``, per-optimisation values for experts) and its
  :meth:`~CPUBackend.resolve` on a device (:class:`ResolvedBackend`; everything off unless the device is the CPU);
- :func:`use_backend`, the one context in which the settings are in force (per thread and context), and
  :func:`tune_allocator_for`, the allocator tuning alone for runs that enter no context;
- the hooks the maths modules call, each returning ``None`` where it did not run: :func:`sample`
  (:func:`monai_icon.networks.maps.interpolate`), :func:`resize` (:func:`monai_icon.networks.maps.resize_linear`),
  :func:`lncc` (the LNCC similarity), :func:`quantiles` (the intensity percentiles of
  :func:`monai_icon.transforms.to_network_grid`) and :func:`unet_head` (the end of
  :class:`~monai_icon.networks.nets.UNet` in evaluation);
- the kernels: :mod:`monai_icon.backend.trilinear`, :mod:`monai_icon.backend.lncc_kernels`,
  :mod:`monai_icon.backend.resize`, :mod:`monai_icon.backend.quantiles`, :mod:`monai_icon.backend.unet_output`; the
  allocator tuning (:mod:`monai_icon.backend.allocator`); what compilation needs
  (:mod:`monai_icon.backend.compilation`).

:class:`~monai_icon.engines.ICONTrainer` takes a ``backend``, the bundles a ``cpu_backend`` key and
``monai-icon register`` / ``register-pairs`` a ``--cpu-backend`` option.
"""

from __future__ import annotations

from monai_icon.backend.allocator import tune_cpu_allocator
from monai_icon.backend.compilation import compiler_available
from monai_icon.backend.lncc_kernels import lncc
from monai_icon.backend.quantiles import quantiles
from monai_icon.backend.resize import resize
from monai_icon.backend.settings import (
    BACKEND_MODES, DEFAULT, CPUBackend, ResolvedBackend, active, as_backend, tune_allocator_for, use_backend,
)
from monai_icon.backend.trilinear import sample
from monai_icon.backend.unet_output import unet_head

__all__ = [
    "BACKEND_MODES", "CPUBackend", "DEFAULT", "ResolvedBackend", "active", "as_backend", "compiler_available", "lncc",
    "quantiles", "resize", "sample", "tune_allocator_for", "tune_cpu_allocator", "unet_head", "use_backend",
]
