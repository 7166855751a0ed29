# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The paper's 2D datasets (triangles & circles, MNIST fives), random pairs, synthetic knees and knee datalists."""

from monai_icon.data.datalist import PAIR_FILE_KEYS, load_pair_datalist, validation_key
from monai_icon.data.deformed_volume import embedded_t1_head, random_smooth_ddf, write_deformed_copies
from monai_icon.data.knee_datalist import build_knee_datalist, find_knee_files, write_datalist
from monai_icon.data.mnist import EMBEDDED_MNIST_FIVES, MNISTFivesDataset, load_mnist_fives, split_indices
from monai_icon.data.pairs import RandomPairDataset
from monai_icon.data.populations import POPULATIONS, get_population
from monai_icon.data.synthetic_knee import (
    KNEE_LABELS,
    KneeAnatomy,
    knee_affine,
    random_knee_anatomy,
    render_knee,
    write_synthetic_knees,
)
from monai_icon.data.triangles_circles import TrianglesCirclesDataset, render_shape, sample_shape_parameters

__all__ = [
    "TrianglesCirclesDataset",
    "render_shape",
    "sample_shape_parameters",
    "MNISTFivesDataset",
    "load_mnist_fives",
    "split_indices",
    "EMBEDDED_MNIST_FIVES",
    "RandomPairDataset",
    "POPULATIONS",
    "get_population",
    "load_pair_datalist",
    "validation_key",
    "PAIR_FILE_KEYS",
    "KNEE_LABELS",
    "KneeAnatomy",
    "knee_affine",
    "random_knee_anatomy",
    "render_knee",
    "write_synthetic_knees",
    "find_knee_files",
    "build_knee_datalist",
    "write_datalist",
    "embedded_t1_head",
    "random_smooth_ddf",
    "write_deformed_copies",
]
