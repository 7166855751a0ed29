# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Writing output files so that a failure never leaves half a file under a final name.

Every output is written to a hidden temporary name in its own folder and renamed into place only once complete
(``os.replace``, atomic on POSIX and Windows). A failed write (a full disk, a file-size limit, a folder that
vanished) raises :class:`WriteError`, removes the temporary files and leaves an earlier file of the same name intact.

* NIfTI (``.nii``, ``.nii.gz``) is written with nibabel, whose writes report every short write.
* Other ITK formats (``.mha``, ``.nrrd``, detached ``.mhd`` / ``.nhdr`` headers with their data files) and ITK
  transforms (``.h5``, ...) are written by ITK in a forked child process where the platform can fork: some ITK
  writers do not report a short write, and HDF5 crashes the process that closes a file it could not write (a
  segmentation fault), so only the child's exit status is trusted.
* Detached-header formats are written into a temporary folder under their final names, so the header names the
  final data file; the data files are moved into place first and the header last.
* Text (JSON) goes through :func:`write_text`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["WriteError", "DETACHED_SUFFIXES", "atomic_write", "run_isolated", "write_text", "write_nifti", "is_nifti",
           "companion_files"]

DETACHED_SUFFIXES = (".mhd", ".nhdr")  # a header and separate data files
# data files ITK writes beside a detached header of this stem
_COMPANIONS = {".mhd": (".raw", ".zraw", ".raw.gz"), ".nhdr": (".raw", ".raw.gz", ".nrrd.gz")}
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class WriteError(OSError):
    """An output file could not be written completely (the earlier file of that name, if any, is unchanged)."""


def _split_suffix(name: str) -> tuple[str, str]:
    lower = name.lower()
    for suffix in (".nii.gz", ".raw.gz", ".tar.gz"):
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def companion_files(path: str | Path) -> list[Path]:
    """Data files that ITK writes beside a detached header ``path`` (``.mhd``, ``.nhdr``); empty otherwise."""
    path = Path(path)
    stem, suffix = _split_suffix(path.name)
    return [path.with_name(stem + ext) for ext in _COMPANIONS.get(suffix.lower(), ())]


def _temporary_name(path: Path) -> Path:
    stem, suffix = _split_suffix(path.name)
    return path.with_name(f".{stem}.{secrets.token_hex(4)}.partial{suffix}")


def atomic_write(path: str | Path, write: Callable[[str], None], what: str = "output") -> Path:
    """Call ``write(temporary_path)`` and rename the result onto ``path``.

    ``temporary_path`` is a hidden name in the same folder with the same extension (for detached-header formats:
    the final name inside a hidden temporary folder, whose files are moved into place data first, header last).

    Raises:
        WriteError: the write or the rename failed (``what`` names the output); nothing is left under ``path``
            that was not there before, and the temporary files are removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"cannot create the folder of the {what} {path}: {err.strerror or err}") from err
    detached = path.name.lower().endswith(DETACHED_SUFFIXES)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial") if detached else _temporary_name(path)
    try:
        if detached:
            temporary.mkdir()
            write(str(temporary / path.name))
            files = sorted(temporary.iterdir(), key=lambda f: f.name == path.name)  # the header last
            for file in files:
                os.replace(file, path.with_name(file.name))
        else:
            write(str(temporary))
            os.replace(temporary, path)
    except WriteError:
        raise
    except (OSError, RuntimeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[-1:]
        reason = reason if isinstance(reason, str) else (reason[0] if reason else type(err).__name__)
        raise WriteError(f"could not write the {what} {path}: {reason} (is the disk full or a file-size limit "
                         f"reached?); {path.name} was left as it was") from err
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()
    return path


def run_isolated(write: Callable[[], None]) -> None:
    """Run ``write`` in a forked child process where the platform can fork (else here) and raise ``OSError`` with
    the child's error when it fails or crashes: native writers that crash on a failed write cannot take this
    process with them."""
    if not hasattr(os, "fork"):
        write()
        return
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():  # a multi-threaded parent: the child only writes one file and exits
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no memory to fork: write here
        os.close(read_end)
        os.close(write_end)
        write()
        return
    if pid == 0:  # pragma: no cover - runs in the child (its exit status is what the parent sees)
        code = 1
        try:
            os.close(read_end)
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            write()
            code = 0
        except BaseException as err:  # noqa: BLE001 - reported to the parent through the pipe
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reason = next((line for line in lines if line.startswith("Reason:")), lines[-1] if lines else "")
            os.write(write_end, (reason or type(err).__name__).encode(errors="replace")[:2000])
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise OSError(message.removeprefix("Reason:").strip() if message else
                      f"the writer stopped with {'signal ' + str(-code) if code < 0 else 'status ' + str(code)}")


def write_text(path: str | Path, text: str, what: str = "output") -> Path:
    """Write a text file (e.g. JSON) atomically (see :func:`atomic_write`)."""
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    return atomic_write(path, write, what)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, vector: bool = False,
                what: str = "output") -> Path:
    """Write a NIfTI image atomically with nibabel, as ITK writes it: RAS ``affine`` as both sform and qform
    (scanner), millimetres, and a vector image (``vector``: ``array`` is ``[*N, C]``) as NIfTI's 5D ``vector``
    intent (``[*N, 1, C]``, the layout ITK, ANTs and 3D Slicer read as displacement fields).

    Args:
        array: ``[*N]`` (or ``[*N, C]`` with ``vector``), MONAI array order (NIfTI's index order).
        affine: the voxel-to-world (RAS) affine, ``[D+1, D+1]`` for ``D`` = 2 or 3.
    """
    import nibabel as nib

    array = np.asarray(array)
    dims = array.ndim - (1 if vector else 0)
    affine = np.asarray(affine, dtype=np.float64)
    full = np.eye(4)
    full[:dims, :dims], full[:dims, 3] = affine[:dims, :dims], affine[:dims, dims]
    if vector:  # [*N, C] -> [X, Y, Z, 1, C]
        array = array.reshape(*array.shape[:dims], *([1] * (3 - dims)), 1, array.shape[-1])
    image = nib.Nifti1Image(array, full)
    image.header.set_xyzt_units("mm", "sec")
    image.set_sform(full, code=1)
    image.set_qform(full, code=1)
    if vector:
        image.header.set_intent("vector")
    return atomic_write(path, lambda tmp: nib.save(image, tmp), what)


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(_NIFTI_SUFFIXES)
