# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Declarative network specifications: build a network from *data* without running code from it.

A model file (:func:`monai_icon.apps.save_registration_model`) describes its network as a spec such as
``{"_target_": "monai_icon.networks.multistep_registration", "fine_steps": 1}`` or
``{"_target_": "monai_icon.networks.RegistrationNet", "block": {"_target_": "monai_icon.networks.DisplacementField",
"net": {"_target_": "monai_icon.networks.nets.UNet", "spatial_dims": 2}}}``. Model files come from other people, so
unlike MONAI's ``ConfigParser`` (which imports any ``_target_`` and ``eval``-s every ``"$..."`` string) this
builder accepts only:

* ``_target_`` names under ``monai_icon.networks``, ``monai.networks`` or ``torch.nn`` that resolve to a
  ``torch.nn.Module`` class, or to one of the network factories in :data:`FACTORIES`;
* literal arguments: numbers, booleans, None, strings that are not config syntax (no leading ``$``, ``@``, ``%``),
  lists/tuples of those, and nested specs (dicts with a ``_target_``);
* no other ``_..._`` keys (``_requires_``, ``_disabled_``, ``_mode_``, ...);
* nothing that reaches outside the process: no string that looks like a file path or URL, no argument named like
  a file, folder, URL or download (``pretrained*``, ``*url*``, ``*path*``, ``*file*``, ``*dir*``, ``*weights*``,
  ...) set to anything but ``None``/``False``, and no class whose defaults for such arguments would fetch something
  on construction (e.g. MONAI's ``EfficientNetBN``, ``pretrained=True`` by default);
* a registration network at the top (a :class:`~monai_icon.networks.RegistrationNet` or
  :class:`~monai_icon.networks.RegistrationModule`: a forward taking the image pair and returning a map);
* a size within a memory budget: the network is first built on PyTorch's ``meta`` device (no memory is allocated)
  and its parameters and buffers are counted before the real build.

Anything else raises a :class:`ValueError` that names the offending entry, before anything is allocated. The
weights that go into the network are checked separately (:func:`monai_icon.networks.weights.load_weights`: strict
keys and shapes, finite values).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from monai_icon.memory import available_memory

__all__ = ["ALLOWED_PREFIXES", "FACTORIES", "check_network_spec", "network_bytes", "build_network"]

ALLOWED_PREFIXES = ("monai_icon.networks.", "monai.networks.", "torch.nn.")
# functions (not Module classes) that build networks, with the arguments a model file may not set
FACTORIES: dict[str, frozenset[str]] = {
    "monai_icon.networks.multistep_registration": frozenset({"coarse_weights"}),  # the file carries the weights
    "monai_icon.networks.multistep.multistep_registration": frozenset({"coarse_weights"}),
    "monai_icon.networks.unet_registration": frozenset(),  # one U-Net step or several composed
    "monai_icon.networks.multistep.unet_registration": frozenset(),
    "monai_icon.networks.pretrained.build": frozenset(),  # a published architecture by kind (fine-tuned models)
}
_CONFIG_SYNTAX = ("$", "@", "%")
_LITERALS = (bool, int, float, str, type(None))
# argument names (split at "_") that point outside the process, and those that fetch when merely true
_OUTSIDE_WORDS = frozenset({"pretrained", "pretrain", "download", "url", "uri", "urls", "path", "paths", "file",
                            "files", "filename", "filepath", "dir", "folder", "hub", "repo", "weights", "ckpt",
                            "checkpoint", "root"})
_FETCH_WORDS = frozenset({"pretrained", "pretrain", "download"})
_PATH_MARKS = ("/", "\\", "://", "~")


def _fail(where: str, problem: str) -> ValueError:
    return ValueError(f"refusing the network spec at {where}: {problem} (a model file is data: only allowed "
                      f"_target_ names under {ALLOWED_PREFIXES} and literal arguments).")


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        check_network_spec(value, where)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
    elif isinstance(value, str):
        if value.lstrip().startswith(_CONFIG_SYNTAX):
            raise _fail(where, f"config expression/reference {value[:60]!r}")
        if any(mark in value for mark in _PATH_MARKS):
            raise _fail(where, f"{value[:60]!r} looks like a file path or URL")
    elif not isinstance(value, _LITERALS):
        raise _fail(where, f"a {type(value).__name__} is not a literal")


def check_network_spec(spec: Any, where: str = "network_def") -> None:
    """Check that ``spec`` is a declarative network spec (see the module docstring) without importing anything.

    Raises:
        ValueError: the first offending entry, by its path (e.g. ``network_def.block.net._target_``).
    """
    if not isinstance(spec, Mapping):
        raise _fail(where, f"expected a dict with a _target_, got {type(spec).__name__}")
    target = spec.get("_target_")
    if not isinstance(target, str):
        raise _fail(where, "no _target_ string")
    if not target.startswith(ALLOWED_PREFIXES) or not all(part.isidentifier() for part in target.split(".")):
        raise _fail(f"{where}._target_", f"{target!r} is not an allowed network name")
    for key, value in spec.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise _fail(where, f"argument name {key!r}")
        if key == "_target_":
            continue
        if key.startswith("_"):
            raise _fail(f"{where}.{key}", "config directives are not allowed")
        if key in FACTORIES.get(target, ()):
            raise _fail(f"{where}.{key}", f"{target} may not be given {key!r} from a model file")
        reason = _reaches_outside(key, value)
        if reason:
            raise _fail(f"{where}.{key}", reason)
        _check_value(value, f"{where}.{key}")


def _reaches_outside(name: str, value: Any) -> str | None:
    """Why an argument ``name=value`` could reach the network or the file system (None: it cannot)."""
    words = set(name.lower().split("_"))
    if words & _FETCH_WORDS and value not in (None, False):
        return f"{name}={value!r} would fetch pretrained weights"
    names = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
        if isinstance(value, (list, tuple)) else []
    if words & _OUTSIDE_WORDS and any(names):
        return f"{name}={value!r} names a file, folder, URL or download"
    return None


def _resolve(target: str, given: Mapping[str, Any], where: str) -> Any:
    module_name, _, attribute = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise _fail(f"{where}._target_", f"{target!r} does not exist ({err})") from err
    if not (target in FACTORIES or (isinstance(obj, type) and issubclass(obj, nn.Module))):
        raise _fail(f"{where}._target_", f"{target!r} is neither a torch.nn.Module class nor a known network factory")
    try:
        parameters = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: nothing to check
        parameters = []
    for parameter in parameters:  # defaults that would fetch on construction (e.g. pretrained=True)
        if parameter.name not in given and parameter.default is not inspect.Parameter.empty:
            reason = _reaches_outside(parameter.name, parameter.default)
            if reason:
                raise _fail(f"{where}._target_", f"{target!r} is refused: by default {reason}")
    return obj


def _build(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        factory = _resolve(value["_target_"], value, where)
        kwargs = {k: _build(v, f"{where}.{k}") for k, v in value.items() if k != "_target_"}
        return factory(**kwargs)
    if isinstance(value, (list, tuple)):
        return type(value)(_build(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def _is_registration_network(network: Any) -> bool:
    from monai_icon.networks.blocks import RegistrationModule
    from monai_icon.networks.registration_net import RegistrationNet

    return isinstance(network, (RegistrationNet, RegistrationModule))


def network_bytes(network: nn.Module) -> int:
    """Bytes of a network's parameters and buffers (works on ``meta`` networks: nothing is read)."""
    tensors = [*network.parameters(), *network.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def build_network(spec: Mapping[str, Any], where: str = "network_def", max_bytes: int | None = None) -> nn.Module:
    """Build the registration network a declarative spec describes (see the module docstring for what is refused).

    Args:
        spec: the declarative spec.
        where: the name of the spec in error messages.
        max_bytes: the most bytes of parameters and buffers the network may have (default: half the memory
            available, :func:`monai_icon.memory.available_memory`).

    Raises:
        ValueError: a refused spec (named entry), an unknown name, a build that does not return a registration
            network, or one larger than ``max_bytes``.
    """
    check_network_spec(spec, where)
    try:
        with torch.device("meta"):  # sized before anything is allocated
            shape_only = _build(spec, where)
    except ValueError:
        raise
    except Exception as err:  # a constructor that rejects its arguments, or one that needs real tensors
        raise _fail(where, f"it cannot be built from these arguments without allocating memory "
                           f"({type(err).__name__}: {str(err)[:200]})") from err
    if not _is_registration_network(shape_only):
        raise _fail(where, f"it builds a {type(shape_only).__name__}, not a registration network (a "
                           "monai_icon.networks.RegistrationNet or RegistrationModule)")
    if max_bytes is None:
        available = available_memory()
        max_bytes = None if available is None else available // 2
    size = network_bytes(shape_only)
    if max_bytes is not None and size > max_bytes:
        raise _fail(where, f"its parameters would take {size / 2**30:.2f} GiB, more than the budget of "
                           f"{max_bytes / 2**30:.2f} GiB")
    return _build(spec, where)
