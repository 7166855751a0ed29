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
* no other ``_..._`` keys (``_requires_``, ``_disabled_``, ``_mode_``, ...).

Anything else raises a :class:`ValueError` that names the offending entry, before anything is imported or built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

__all__ = ["ALLOWED_PREFIXES", "FACTORIES", "check_network_spec", "build_network"]

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
        _check_value(value, f"{where}.{key}")


def _resolve(target: str, where: str) -> Any:
    module_name, _, attribute = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise _fail(f"{where}._target_", f"{target!r} does not exist ({err})") from err
    if target in FACTORIES or (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return obj
    raise _fail(f"{where}._target_", f"{target!r} is neither a torch.nn.Module class nor a known network factory")


def _build(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        factory = _resolve(value["_target_"], where)
        kwargs = {k: _build(v, f"{where}.{k}") for k, v in value.items() if k != "_target_"}
        return factory(**kwargs)
    if isinstance(value, (list, tuple)):
        return type(value)(_build(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def build_network(spec: Mapping[str, Any], where: str = "network_def") -> nn.Module:
    """Build the network a declarative spec describes (checked first by :func:`check_network_spec`).

    Raises:
        ValueError: a refused spec (named entry), an unknown name, or a build that does not return a Module.
    """
    check_network_spec(spec, where)
    network = _build(spec, where)
    if not isinstance(network, nn.Module):
        raise _fail(where, f"it built a {type(network).__name__}, not a torch.nn.Module")
    return network
