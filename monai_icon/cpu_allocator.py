# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Deprecated path of :mod:`monai_icon.backend.allocator`, kept for existing code; the CPU backend
(:class:`monai_icon.backend.CPUBackend`, ``tune_allocator``) tunes the allocator on the CPU."""

from __future__ import annotations

from monai_icon.backend.allocator import (  # noqa: F401 - _glibc for existing imports
    DEFAULT_MMAP_THRESHOLD, DEFAULT_TRIM_THRESHOLD, _glibc, tune_cpu_allocator,
)

__all__ = ["DEFAULT_MMAP_THRESHOLD", "DEFAULT_TRIM_THRESHOLD", "tune_cpu_allocator"]
