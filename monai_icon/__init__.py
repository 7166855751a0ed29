# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""monai-icon: inverse-consistent deep image registration (ICON, Greer et al., ICCV 2021) for MONAI.

Sub-packages follow the data flow: ``data`` -> ``networks`` (maps, blocks, nets) -> ``losses`` -> ``metrics``
-> ``engines`` / ``handlers`` -> the MONAI bundles in ``bundle/``; ``apps`` registers real image files in physical
space (the ``monai-icon`` command line); ``config`` reads settings given on command lines.
"""

from monai_icon import (apps, config, cpu_allocator, data, engines, handlers, losses, metrics, networks, reporting,
                        transforms)

__version__ = "0.1.0"

__all__ = [
    "apps",
    "config",
    "cpu_allocator",
    "data",
    "transforms",
    "networks",
    "losses",
    "metrics",
    "engines",
    "handlers",
    "reporting",
    "__version__",
]
