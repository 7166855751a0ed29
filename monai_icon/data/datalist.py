# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Pair datalists: JSON lists of moving/fixed image (and label) files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["PAIR_FILE_KEYS", "load_pair_datalist"]

PAIR_FILE_KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label")


def load_pair_datalist(path: str | Path, key: str = "pairs") -> list[dict[str, Any]]:
    """Read a pair datalist.

    The file is JSON: either a list of pairs or ``{"pairs": [...]}`` (``key``), each pair a dictionary with
    ``moving_image`` and ``fixed_image`` (and optionally ``moving_label``, ``fixed_label``) file paths; relative
    paths are taken from the JSON file's folder. Other keys are passed through.

    Raises:
        FileNotFoundError: the datalist or a listed file is missing (the message names it).
        ValueError: the JSON is malformed or a pair lacks an image key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair datalist not found: {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    pairs = content.get(key) if isinstance(content, dict) else content
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"{path} must hold a non-empty list of pairs (or {{'{key}': [...]}}).")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not {"moving_image", "fixed_image"} <= set(pair):
            raise ValueError(f"{path}: pair {i} needs 'moving_image' and 'fixed_image', got {pair!r}.")
        item = dict(pair)
        for k in PAIR_FILE_KEYS:
            if k in item:
                file = Path(item[k]) if Path(item[k]).is_absolute() else path.parent / item[k]
                if not file.is_file():
                    raise FileNotFoundError(f"{path}: pair {i} {k} file not found: {file}")
                item[k] = str(file)
        out.append(item)
    return out
