# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Ignite metric handlers for registration outputs (see :class:`~monai_icon.engines.RegKeys`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.handlers import IgniteMetricHandler, MeanDice, from_engine
from monai.utils import MetricReduction

from monai_icon.engines.keys import RegKeys
from monai_icon.metrics import FoldsMetric, ThresholdDiceMetric, ValueMetric

__all__ = ["ThresholdDice", "LabelDice", "Folds", "OutputValue", "pair_names"]


def _values_only(key: str) -> Callable[[Any], tuple[Any, None]]:
    pick = from_engine([key])

    def transform(output: Any) -> tuple[Any, None]:
        values = pick(output)  # from_engine returns the bare value (list) for a single key
        if isinstance(values, (list, tuple)):  # decollation turns scalar tensors into Python numbers
            values = [torch.as_tensor(v) for v in values]
        return values, None

    return transform


class ThresholdDice(IgniteMetricHandler):
    """Dice of the warped moving and the fixed image thresholded at ``threshold`` (paper Sec. 4.4).

    Reads ``pred`` and ``fixed_image`` from the engine output by default.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = from_engine([RegKeys.PRED, RegKeys.FIXED]),
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=ThresholdDiceMetric(threshold, reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


def _label_channel(pred_key: str, label_key: str, label: int) -> Callable[[Any], tuple[list, list]]:
    pick = from_engine([pred_key, label_key])

    def transform(output: Any) -> tuple[list, list]:
        pred, truth = pick(output)
        return [p[label : label + 1] for p in pred], [t[label : label + 1] for t in truth]

    return transform


class LabelDice(MeanDice):
    """Dice of the warped moving labels and the fixed labels (one-hot ``pred_label`` / ``fixed_label`` outputs of
    :class:`~monai_icon.engines.ICONEvaluator`), MONAI's ``DiceMetric`` underneath.

    Args:
        label: one label value (e.g. 1 = femoral cartilage) for its own Dice; ``None``: the mean over all labels
            except the background.
        pred_key: ``"pred_label"`` (registered) or ``"moving_label"`` (before registration).
        reduction, save_details: as MONAI's ``MeanDice`` (per-pair values are kept for ``MetricsSaver``).
    """

    def __init__(
        self,
        label: int | None = None,
        pred_key: str = RegKeys.PRED_LABEL,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        save_details: bool = True,
    ) -> None:
        if label is None:
            transform, background = from_engine([pred_key, RegKeys.FIXED_LABEL]), False
        else:
            if int(label) < 0:
                raise ValueError(f"label must be a non-negative label value, got {label}.")
            transform, background = _label_channel(pred_key, RegKeys.FIXED_LABEL, int(label)), True
        super().__init__(
            include_background=background, reduction=reduction, output_transform=transform, save_details=save_details
        )


class Folds(IgniteMetricHandler):
    """Folds of ``phi_AB`` per pair (count, or percentage of cells) from the engine's voxel DDF (``ddf``)."""

    def __init__(
        self,
        percentage: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = _values_only(RegKeys.DDF),
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=FoldsMetric(percentage, "ddf", reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


class OutputValue(IgniteMetricHandler):
    """Average (or other reduction) of a per-pair value already in the engine output, e.g. ``similarity``,
    ``inverse_consistency`` or ``time``; per-pair values are kept for ``MetricsSaver``."""

    def __init__(
        self, key: str, reduction: MetricReduction | str = MetricReduction.MEAN, save_details: bool = True
    ) -> None:
        super().__init__(
            metric_fn=ValueMetric(reduction), output_transform=_values_only(key), save_details=save_details
        )


def pair_names(batch: Any) -> Sequence[dict[str, str]]:
    """``batch_transform`` for ``monai.handlers.MetricsSaver``: one ``{"filename_or_obj": pair_id}`` per pair,
    from a batch dictionary or a decollated list of pair dictionaries."""
    items = (
        batch if isinstance(batch, (list, tuple)) else [{RegKeys.PAIR_ID: n} for n in batch.get(RegKeys.PAIR_ID, [])]
    )
    if not items or any(RegKeys.PAIR_ID not in item for item in items):
        raise ValueError(f"the batch has no {RegKeys.PAIR_ID!r} to name the pairs in the metric CSV files.")
    return [{"filename_or_obj": str(item[RegKeys.PAIR_ID])} for item in items]
