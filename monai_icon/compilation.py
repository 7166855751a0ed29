# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Deprecated path of :mod:`monai_icon.backend.compilation`, kept for existing code."""

from __future__ import annotations

from monai_icon.backend.compilation import compiler_available, run_compiled

__all__ = ["compiler_available", "run_compiled"]
