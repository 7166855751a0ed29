# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""MONAI dictionary transforms for registration pairs."""

from monai_icon.transforms.pair import EnsureSameShaped, Warpd

__all__ = ["EnsureSameShaped", "Warpd"]
