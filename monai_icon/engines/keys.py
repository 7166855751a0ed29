# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Keys of registration batches and of the engines' ``engine.state.output``."""

__all__ = ["RegKeys"]


class RegKeys:
    """Dictionary keys used by the data, the engines, the metric handlers and the bundle.

    Batches: ``MOVING``, ``FIXED`` images ``[B, C, *N]``, optional ``MOVING_LABEL``, ``FIXED_LABEL`` ``[B, 1, *N]``
    (integer labels) and ``PAIR_ID`` (a name per pair).
    Engine outputs (per pair after decollation): ``PRED`` = warped moving image on the fixed grid, ``DDF`` =
    MONAI voxel DDF of ``phi_AB``, ``PRED_LABEL`` / ``FIXED_LABEL`` / ``MOVING_LABEL`` = one-hot warped moving /
    fixed / unwarped moving labels, ``LOSS``, ``SIMILARITY``, ``INVERSE_CONSISTENCY``, ``FOLDS`` (count of
    ``phi_AB``), ``LMBDA``, ``TIME`` (seconds per pair, evaluator).
    """

    MOVING = "moving_image"
    FIXED = "fixed_image"
    MOVING_LABEL = "moving_label"
    FIXED_LABEL = "fixed_label"
    MOVING_MASK = "moving_mask"
    FIXED_MASK = "fixed_mask"
    PAIR_ID = "pair_id"
    PRED = "pred"
    PRED_LABEL = "pred_label"
    DDF = "ddf"
    LOSS = "loss"
    SIMILARITY = "similarity"
    INVERSE_CONSISTENCY = "inverse_consistency"
    FOLDS = "folds"
    LMBDA = "lmbda"
    TIME = "time"
