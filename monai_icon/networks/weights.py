# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Loading saved weights into a network, strictly and with errors that say what does not match."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

__all__ = ["read_checkpoint", "extract_state_dict", "check_finite_weights", "load_weights", "apply_checkpoint"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)
_NESTED_KEYS = ("model", "network", "state_dict")


def read_checkpoint(path: str | Path, what: str = "weights file", hint: str = "") -> Mapping[str, Any]:
    """Read a ``torch.save`` dictionary safely (``weights_only``) on the CPU.

    Raises:
        FileNotFoundError: no such file (``what`` and ``hint`` go into the message).
        ValueError: unreadable/corrupt file, or not a dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}{f' ({hint})' if hint else ''}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"cannot read the {what} {path}: {err}") from err
    if not isinstance(content, Mapping):
        raise ValueError(f"{path} does not hold a dictionary of tensors (got {type(content).__name__}).")
    return content


def extract_state_dict(checkpoint: Mapping[str, Any], network: nn.Module) -> Mapping[str, torch.Tensor]:
    """The network's state dict inside ``checkpoint``: either the checkpoint itself (Ignite/MONAI
    ``CheckpointSaver`` with one object) or its ``"model"``/``"network"``/``"state_dict"`` entry (resume
    checkpoints, :func:`monai_icon.apps.save_model` files)."""
    for key in _NESTED_KEYS:
        if isinstance(checkpoint.get(key), Mapping) and not set(network.state_dict()) & set(checkpoint):
            return checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint  # a flat state dict (whether or not its keys match: the caller compares them)
    raise ValueError(f"the checkpoint holds no state dict of this network (top-level keys: {sorted(checkpoint)[:8]}).")


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse a state dict with a NaN or infinite value in any floating-point tensor, naming the first such tensor.

    Raises:
        ValueError: ``"<source>: weight '<key>' holds N NaN/infinite values ..."``.
    """
    bad = [(key, int((~torch.isfinite(value)).sum())) for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        key, count = bad[0]
        raise ValueError(f"{source}: weight {key!r} holds {count} NaN or infinite value(s)"
                         f"{f' ({len(bad) - 1} more tensors too)' if len(bad) > 1 else ''}; the file is corrupt.")


def load_weights(network: ModuleT, path: str | Path) -> ModuleT:
    """Load a checkpoint file into ``network`` strictly (every key and shape must match) and return it (tensors
    are copied onto the network's own device).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, keys/shapes that do not match (the first differences are listed), or
            non-finite weights (the first such tensor is named).
    """
    return apply_checkpoint(network, read_checkpoint(path), path)


def apply_checkpoint(network: ModuleT, checkpoint: Mapping[str, Any], source: str | Path) -> ModuleT:
    """:func:`load_weights` for a checkpoint already read (:func:`read_checkpoint`); ``source`` names it in errors.

    Raises:
        ValueError: keys/shapes that do not match, or non-finite weights.
    """
    state = extract_state_dict(checkpoint, network)
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not match the network: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} "
            f"unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches {wrong[:5]}."
        )
    check_finite_weights(state, source)
    network.load_state_dict(state, strict=True)
    return network
