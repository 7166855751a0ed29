# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Applications: registering real image files in physical space (``monai-icon register``) and the CLI."""

from monai_icon.apps.atlas import AtlasSegmentation
from monai_icon.apps.finetune import ToNetworkGridd, export_finetuned, pretrained_settings
from monai_icon.apps.physical import (
    fixed_to_moving_world,
    load_image,
    sample_world,
    to_network_grid,
    unit_to_world,
    write_displacement,
    write_image,
)
from monai_icon.apps.batch import pair_outputs, register_pairs
from monai_icon.apps.files import OutputFiles, PairFiles
from monai_icon.apps.model_files import RegistrationModel, load_registration_model, save_registration_model
from monai_icon.apps.register import instance_optimise, register_files, register_images, restored_weights
from monai_icon.engines.instance_optimisation import Refinement

__all__ = [
    "AtlasSegmentation",
    "ToNetworkGridd",
    "pretrained_settings",
    "export_finetuned",
    "RegistrationModel",
    "save_registration_model",
    "load_registration_model",
    "register_images",
    "register_files",
    "PairFiles",
    "OutputFiles",
    "Refinement",
    "register_pairs",
    "pair_outputs",
    "instance_optimise",
    "restored_weights",
    "load_image",
    "to_network_grid",
    "unit_to_world",
    "fixed_to_moving_world",
    "sample_world",
    "write_image",
    "write_displacement",
]
