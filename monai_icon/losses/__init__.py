# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Losses: inverse consistency (ICON), gradient inverse consistency (GradICON), similarity
(MSE, LNCC, MI, MIND-SSC), the ICON total, supervision by a known map, the diffusion regulariser of a field."""

from monai_icon.losses.diffusion import diffusion_energy
from monai_icon.losses.gradient_inverse_consistency import GradientInverseConsistencyLoss, gradient_inverse_consistency
from monai_icon.losses.icon import REGULARIZERS, ICONLoss, ICONLossOutput, icon_loss
from monai_icon.losses.map_supervision import MapSupervisionLoss
from monai_icon.losses.inverse_consistency import InverseConsistencyLoss, inverse_consistency, sample_points
from monai_icon.losses.mind import MINDSSCLoss, mind_ssc
from monai_icon.losses.multiscale import MultiScaleSimilarity
from monai_icon.losses.similarity import SIMILARITIES, StackedLNCCLoss, get_similarity, per_pair

__all__ = [
    "InverseConsistencyLoss",
    "inverse_consistency",
    "sample_points",
    "GradientInverseConsistencyLoss",
    "gradient_inverse_consistency",
    "ICONLoss",
    "ICONLossOutput",
    "icon_loss",
    "MapSupervisionLoss",
    "REGULARIZERS",
    "SIMILARITIES",
    "StackedLNCCLoss",
    "MINDSSCLoss",
    "mind_ssc",
    "MultiScaleSimilarity",
    "get_similarity",
    "per_pair",
    "diffusion_energy",
]
