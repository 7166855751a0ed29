# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Registration metrics: folds (negative Jacobian determinant), thresholded Dice, per-pair values."""

from monai_icon.metrics.dice import ThresholdDiceMetric, label_dice, threshold_dice
from monai_icon.metrics.folds import FoldsMetric, count_folds, jacobian_determinant
from monai_icon.metrics.value import ValueMetric

__all__ = ["jacobian_determinant", "count_folds", "FoldsMetric", "threshold_dice", "ThresholdDiceMetric", "label_dice",
           "ValueMetric"]
