# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Reusing freed CPU memory instead of returning it to the operating system (glibc ``malloc``).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its mmap threshold
(128 KiB, raised dynamically to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when the
tensor dies, so each new large tensor of a training step is a new mapping whose pages the kernel zero-fills on
first touch (one page fault per 4 KiB). A 3D registration step allocates and frees many such tensors (images,
fields, the LNCC's local sums at 128x64x128 are 4-80 MiB each): on the T1-head demo's step that was 15 million
page faults per 60 steps and a quarter of the step's time (``docs/benchmarks.md``). With a high mmap threshold and
a high trim threshold, freed blocks stay in the heap and the next step's tensors reuse them (about 0.5 million
faults). The process then keeps its peak heap mapped until it exits, which is what a training or registration
process does anyway; nothing else changes (same values, same results).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["DEFAULT_MMAP_THRESHOLD", "DEFAULT_TRIM_THRESHOLD", "tune_cpu_allocator"]

#: blocks up to this size (bytes) come from the heap and are reused: 1 GiB
DEFAULT_MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap kept before any is returned to the system (bytes): the largest C ``int``
DEFAULT_TRIM_THRESHOLD = (1 << 31) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_INT_MAX = (1 << 31) - 1


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # e.g. musl, whose malloc has no such thresholds
    return libc


def tune_cpu_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> bool:
    """Make glibc's ``malloc`` keep large freed blocks for reuse (``mallopt(M_MMAP_THRESHOLD)`` and
    ``mallopt(M_TRIM_THRESHOLD)``) for the rest of this process.

    Args:
        mmap_threshold: blocks of at most this many bytes are served from the heap (default 1 GiB); larger ones
            still get their own mapping.
        trim_threshold: bytes of free memory at the top of the heap kept before the rest is returned to the system
            (default the largest C ``int``, about 2 GiB).

    Returns:
        ``True`` when both settings were applied; ``False`` where the C library is not glibc (macOS, Windows, musl)
        or refused a value: nothing is changed there and everything runs as before, only slower on CPU.

    Raises:
        ValueError: a threshold that is not an integer in ``[0, 2**31 - 1]`` (``mallopt`` takes a C ``int``).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
            raise ValueError(f"{name} must be an integer number of bytes in [0, {_INT_MAX}], got {value!r}.")
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and trimmed
