# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""MONAI dictionary transforms: registration pairs, knee laterality, the OAI preprocessing pipeline, batch
augmentation, images synthesised from label maps and pairs with a known map."""

from monai_icon.transforms.augment import (
    RandBatchAugmentd,
    affine_warp,
    chain_batch_transforms,
    random_affine_theta,
    random_smooth_displacement,
)
from monai_icon.transforms.grid import check_network_grid, network_grid_spacing, reoriented_geometry
from monai_icon.transforms.laterality import (
    HarmoniseLaterality,
    HarmoniseLateralityd,
    left_right_axis,
    normalise_side,
    side_from_filename,
)
from monai_icon.transforms.network_grid import NetworkGrid, ToNetworkGridd, to_network_grid
from monai_icon.transforms.oai import OAI_SPATIAL_SIZE, oai_pair_transforms, oai_preprocessing, oai_train_transforms
from monai_icon.transforms.pair import EnsureSameShaped, Warpd
from monai_icon.transforms.self_pair import TARGET_MAP, TARGET_WEIGHT, RandSelfPaird
from monai_icon.transforms.synthesis import (
    RandLabelSynthesisd,
    random_bias_field,
    random_shapes,
    smooth_noise,
    synthesise_from_labels,
)

__all__ = [
    "NetworkGrid",
    "ToNetworkGridd",
    "to_network_grid",
    "RandBatchAugmentd",
    "affine_warp",
    "chain_batch_transforms",
    "random_affine_theta",
    "random_smooth_displacement",
    "RandSelfPaird",
    "RandLabelSynthesisd",
    "random_bias_field",
    "random_shapes",
    "smooth_noise",
    "synthesise_from_labels",
    "TARGET_MAP",
    "TARGET_WEIGHT",
    "EnsureSameShaped",
    "Warpd",
    "check_network_grid",
    "network_grid_spacing",
    "reoriented_geometry",
    "HarmoniseLaterality",
    "HarmoniseLateralityd",
    "left_right_axis",
    "normalise_side",
    "side_from_filename",
    "OAI_SPATIAL_SIZE",
    "oai_preprocessing",
    "oai_train_transforms",
    "oai_pair_transforms",
]
