# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""MONAI/Ignite engines for inverse-consistent registration."""

from monai_icon.engines import distributed
from monai_icon.engines.evaluator import ICONEvaluator
from monai_icon.engines.instance_optimisation import InstanceOptimisedNet
from monai_icon.engines.keys import RegKeys
from monai_icon.engines.prepare_batch import PrepareRegistrationBatch
from monai_icon.engines.trainer import ICONTrainer

__all__ = ["distributed", "ICONTrainer", "ICONEvaluator", "InstanceOptimisedNet", "PrepareRegistrationBatch", "RegKeys"]
