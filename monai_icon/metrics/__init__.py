# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Registration metrics: folds (negative Jacobian determinant) and thresholded Dice."""

from monai_icon.metrics.dice import threshold_dice
from monai_icon.metrics.folds import FoldsMetric, count_folds, jacobian_determinant

__all__ = ["jacobian_determinant", "count_folds", "FoldsMetric", "threshold_dice"]
