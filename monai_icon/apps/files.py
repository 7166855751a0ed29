# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""The files of one registration as values: :class:`PairFiles` (what is read) and :class:`OutputFiles` (what is
written), given to :func:`monai_icon.apps.register_files` together with a
:class:`~monai_icon.engines.instance_optimisation.Refinement` (the instance-optimisation settings)::

    register_files(inputs=PairFiles("F.nii.gz", "M.nii.gz"), outputs=OutputFiles(warped="W.nii.gz"), model=model)

Each value is frozen; :meth:`PairFiles.merge`, :meth:`OutputFiles.merge` and :func:`refinement_from_keywords` turn the
loose keywords that :func:`~monai_icon.apps.register_files` also accepts into these values, refusing a value given
together with keywords for the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from monai_icon.engines.instance_optimisation import Refinement

__all__ = ["PairFiles", "OutputFiles", "refinement_from_keywords"]

PathLike = str | Path


def _given(value: Any, keywords: dict[str, Any], name: str, what: str) -> list[str]:
    """The keywords that are set (not ``None``) next to a ``value`` given as ``name=``: refused."""
    given = sorted(k for k, v in keywords.items() if v is not None)
    if value is not None and given:
        raise ValueError(f"give the {what} either as {name}= or as {given}, not both.")
    return given


@dataclass(frozen=True)
class PairFiles:
    """The files of one pair to register (NIfTI, MHA, NRRD, ...; any spacing, orientation and size).

    Attributes:
        fixed, moving: the images; results are written on the fixed image's grid.
        fixed_label, moving_label: label maps on the images' grids: ``moving_label`` is warped (with
            :attr:`OutputFiles.warped_label`); both together supervise instance optimisation (``label_weight``).
        fixed_mask, moving_mask: masks on the images' grids (both or neither; nonzero = inside): input and loss
            masking.
        fixed_side, moving_side: knee sides (``LEFT``/``RIGHT``) for models trained on one side; by default taken
            from ``LEFT``/``RIGHT`` in the file names when the model has a ``target_side``.
    """

    fixed: PathLike
    moving: PathLike
    fixed_label: PathLike | None = None
    moving_label: PathLike | None = None
    fixed_mask: PathLike | None = None
    moving_mask: PathLike | None = None
    fixed_side: str | None = None
    moving_side: str | None = None

    def roles(self) -> dict[str, PathLike | None]:
        """The files by role, as error messages name them (``"fixed image"``, ``"moving label"``, ...)."""
        return {"fixed image": self.fixed, "moving image": self.moving, "fixed label": self.fixed_label,
                "moving label": self.moving_label, "fixed mask": self.fixed_mask, "moving mask": self.moving_mask}

    @staticmethod
    def merge(inputs: PairFiles | None, **keywords: Any) -> PairFiles:
        """``inputs``, or the value of the loose keywords (``fixed``, ``moving``, ``moving_label``, ...) when it is
        ``None``.

        Raises:
            ValueError: ``inputs`` together with keywords that are set (one source of files, never a silent mix).
            TypeError: neither ``inputs`` nor both ``fixed`` and ``moving``.
        """
        given = _given(inputs, keywords, "inputs", "input files")
        if inputs is not None:
            return inputs
        if keywords.get("fixed") is None or keywords.get("moving") is None:
            raise TypeError("give the fixed and moving images: inputs=PairFiles(fixed, moving) or fixed=, moving=.")
        return PairFiles(**{k: keywords[k] for k in given})


@dataclass(frozen=True)
class OutputFiles:
    """The files a registration writes, all on the fixed image's grid (at least one).

    Attributes:
        warped: the moving image resampled onto the fixed grid (linear).
        ddf: the displacement field (LPS mm, ITK/ANTs convention; see
            :func:`~monai_icon.apps.physical.write_displacement`).
        transform: an ITK displacement-field transform (``.h5``), applied by ITK/3D Slicer/ANTs.
        warped_label: :attr:`PairFiles.moving_label` warped onto the fixed grid (one-hot linear interpolation +
            arg-max, integer labels kept); needs the moving label map.
    """

    warped: PathLike | None = None
    ddf: PathLike | None = None
    transform: PathLike | None = None
    warped_label: PathLike | None = None

    def roles(self) -> dict[str, PathLike | None]:
        """The files by role (the keyword names)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def merge(outputs: OutputFiles | None, **keywords: Any) -> OutputFiles:
        """``outputs``, or the value of the loose keywords (``warped``, ``ddf``, ...) when it is ``None``.

        Raises:
            ValueError: ``outputs`` together with keywords that are set.
        """
        given = _given(outputs, keywords, "outputs", "output files")
        return outputs if outputs is not None else OutputFiles(**{k: keywords[k] for k in given})


#: the loose keywords of each value, as :func:`~monai_icon.apps.register_files` accepts them
PAIR_KEYWORDS = tuple(f.name for f in fields(PairFiles))
OUTPUT_KEYWORDS = tuple(f.name for f in fields(OutputFiles))
REFINEMENT_KEYWORDS = tuple(Refinement().arguments())


def refinement_from_keywords(refinement: Refinement | None, **io_keywords: Any) -> Refinement:
    """``refinement``, or the :class:`~monai_icon.engines.instance_optimisation.Refinement` of the ``io_*`` keywords
    (those not given take its defaults) when it is ``None`` (:meth:`Refinement.merge`).

    Raises:
        ValueError: ``refinement`` together with ``io_*`` keywords that differ from their defaults.
    """
    unknown = sorted(set(io_keywords) - set(REFINEMENT_KEYWORDS))
    if unknown:
        raise TypeError(f"unknown instance-optimisation keywords {unknown}; known: {list(REFINEMENT_KEYWORDS)}.")
    arguments = {**Refinement().arguments(), **io_keywords}
    merged = Refinement.merge(refinement, **arguments)
    return Refinement(**{key.removeprefix("io_"): value for key, value in merged.items()})


def split_keywords(function: str, keywords: dict[str, Any], *groups: tuple[str, ...]) -> list[dict[str, Any]]:
    """``keywords`` split into one dictionary per group of names.

    Raises:
        TypeError: a keyword in no group (as Python reports an unexpected keyword argument of ``function``).
    """
    known = {name for group in groups for name in group}
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}.")
    return [{k: v for k, v in keywords.items() if k in group} for group in groups]
