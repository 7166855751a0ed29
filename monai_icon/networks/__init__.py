# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Maps (``maps``), registration blocks (``blocks``) and displacement networks (``nets``)."""

from monai_icon.networks import blocks, ensemble, maps, nets
from monai_icon.networks.blocks import (
    Affine, DisplacementField, Downsample, Frozen, RegistrationModule, TwoStep, space_to_depth,
)
from monai_icon.networks.ensemble import TestTimeEnsemble, ensemble_network
from monai_icon.networks.maps import AffineMap, ComposedMap, DisplacementMap, IdentityMap, Map
from monai_icon.networks.multistep import chain, multistep_registration, unet_registration, unet_step
from monai_icon.networks.registration_net import RegistrationNet, register_one_way, register_pair
from monai_icon.networks.weights import extract_state_dict, load_weights

__all__ = [
    "blocks",
    "ensemble",
    "maps",
    "nets",
    "RegistrationModule",
    "DisplacementField",
    "Affine",
    "TwoStep",
    "Downsample",
    "space_to_depth",
    "Frozen",
    "TestTimeEnsemble",
    "ensemble_network",
    "unet_step",
    "chain",
    "multistep_registration",
    "unet_registration",
    "load_weights",
    "extract_state_dict",
    "Map",
    "DisplacementMap",
    "AffineMap",
    "ComposedMap",
    "IdentityMap",
    "RegistrationNet",
    "register_pair",
    "register_one_way",
]
