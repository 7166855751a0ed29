# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""monai_icon.cpu_allocator: freed large CPU blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monai_icon.cpu_allocator import _glibc, tune_cpu_allocator

# allocates and frees a 64 MiB tensor 8 times (written to, so that every page is touched) and prints the minor page
# faults of each round; with the argument "tune" after tune_cpu_allocator()
_PROBE = """
import resource, sys, torch
from monai_icon.cpu_allocator import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tune" else None
faults = []
for _ in range(8):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(applied, *faults)
"""
PAGES = (64 << 20) // 4096  # the pages of one 64 MiB block


def _probe(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied, [int(f) for f in faults]


@pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc")
def test_freed_blocks_are_reused():
    applied, tuned = _probe("tune")
    assert applied == "True"
    _, default = _probe("default")
    assert all(f > PAGES // 2 for f in default[2:])  # glibc's default: every 64 MiB block is a new mapping
    # tuned: after the first rounds have placed the block in the heap, it is reused without new pages
    assert sum(f < PAGES // 20 for f in tuned[2:]) >= 4, tuned


def test_thresholds_checked():
    for bad in (-1, 1 << 31, 1.5, True, "1"):
        with pytest.raises(ValueError, match="mmap_threshold"):
            tune_cpu_allocator(mmap_threshold=bad)
        with pytest.raises(ValueError, match="trim_threshold"):
            tune_cpu_allocator(trim_threshold=bad)


def test_not_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tune_cpu_allocator() is False
