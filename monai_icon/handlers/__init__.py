# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Ignite handlers: registration metrics, the adaptive lambda schedule and lambda continuation, progress, figures
and checkpoint discovery."""

from monai_icon.handlers.adaptive_lambda import AdaptiveLambdaHandler, batch_mean_folds
from monai_icon.handlers.checkpoint import AtomicCheckpointSaver, latest_checkpoint, require_file
from monai_icon.handlers.figures import RegistrationFigureHandler
from monai_icon.handlers.gradient_clipping import GradientClipHandler
from monai_icon.handlers.metrics import Folds, LabelDice, OutputValue, ThresholdDice, pair_names
from monai_icon.handlers.progress import ProgressHandler
from monai_icon.handlers.schedules import LambdaScheduleHandler, LearningRateScheduleHandler

__all__ = [
    "AdaptiveLambdaHandler",
    "batch_mean_folds",
    "AtomicCheckpointSaver",
    "latest_checkpoint",
    "require_file",
    "RegistrationFigureHandler",
    "GradientClipHandler",
    "LambdaScheduleHandler",
    "LearningRateScheduleHandler",
    "ProgressHandler",
    "ThresholdDice",
    "LabelDice",
    "Folds",
    "OutputValue",
    "pair_names",
]
