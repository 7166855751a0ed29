# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""What the earlier module paths (``monai_icon.networks.trilinear``, ``monai_icon.losses.compiled_lncc``) still
offer: a context that turns one optimisation on or off, and a read-only view of a kernel's state."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from monai_icon.backend.settings import active, use_backend


@contextlib.contextmanager
def one_setting(name: str, enabled: bool) -> Iterator[None]:
    """The active settings with ``name`` (a :class:`~monai_icon.backend.ResolvedBackend` field) set to ``enabled``,
    entered through :func:`~monai_icon.backend.use_backend` (restored on exit)."""
    with use_backend(dataclasses.replace(active(), **{name: bool(enabled)})):
        yield


class KernelState(Mapping):
    """A kernel's state as the earlier modules showed it: ``"enabled"`` (the active setting ``name``) and the keys of
    the kernel module's compile cache (``module._state``, read at each access)."""

    def __init__(self, module: ModuleType, name: str) -> None:
        self._module, self._name = module, name

    def _items(self) -> dict[str, Any]:
        return {**self._module._state, "enabled": getattr(active(), self._name)}

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())
