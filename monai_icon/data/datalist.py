# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Pair datalists: JSON lists of moving/fixed image (and label) files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

__all__ = ["PAIR_FILE_KEYS", "load_pair_datalist", "validation_key"]

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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a pair datalist.") from None
    pairs = content.get(key) if isinstance(content, dict) else content
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"{path} must hold a non-empty list of pairs (or {{'{key}': [...]}}).")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or not {"moving_image", "fixed_image"} <= set(pair):
            raise ValueError(f"{path}: pair {i} needs 'moving_image' and 'fixed_image', got {pair!r}.")
        item = dict(pair)
        for k in PAIR_FILE_KEYS:
            if k in item and item[k] is None and k in ("moving_label", "fixed_label"):
                del item[k]  # an optional file given as null: absent
            if k in item:
                if not isinstance(item[k], str) or not item[k].strip() or "\0" in item[k]:
                    raise ValueError(f"{path}: pair {i} {k} must be a file path (a non-empty string), got "
                                     f"{str(item[k])[:80]!r}.")
                file = Path(item[k]) if Path(item[k]).is_absolute() else path.parent / item[k]
                if not file.is_file():
                    raise FileNotFoundError(f"{path}: pair {i} {k} file not found: {file}")
                item[k] = str(file)
        out.append(item)
    return out


def validation_key(path: str | Path) -> str:
    """The key of the pairs to validate on during training: ``"validation_pairs"`` when the datalist has them,
    else ``"test_pairs"`` with a warning (model selection on test pairs is not an honest test any more)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path} (build it with: monai-icon datalist FOLDER --output FILE)")
    content = json.loads(path.read_text())
    if isinstance(content, dict) and content.get("validation_pairs"):
        return "validation_pairs"
    warnings.warn(f"{path} has no validation_pairs: validating on its test pairs (build the datalist with "
                  "monai-icon datalist --val-fraction 0.2 to keep the test pairs for the final report only).",
                  stacklevel=2)
    return "test_pairs"
