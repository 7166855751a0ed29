# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Registering many pairs in several processes started by ``torchrun`` (``monai-icon register-pairs``).

Each process (rank) registers its own share of the pairs (:func:`shard_pairs`: every pair exactly once, so no output
file is written twice), on its own device (:func:`rank_device`: ``cuda:LOCAL_RANK``), and rank 0 gathers the
per-pair summaries back into the datalist's order (:func:`gather_in_order`) to write the one ``summary.json``. A
failing pair stops its own process's share with a :class:`PairError` naming the pair and the rank (:func:`run_pair`);
the other processes finish their shares first, and then every process learns of the failure (:func:`rank_failures`),
so that no finished work is lost and ``--resume`` has only the failed rank's remaining pairs left to do. Without
``torchrun`` everything runs in one process, as before::

    env = torchrun_env()
    device = rank_device(args.device, env)
    with process_group(device) as env:
        mine = shard_pairs(pairs, env.rank, env.world_size)
        failure, done = None, []
        try:
            done = [(i, run_pair(register_one, pair_name(p, i), p, i, env=env)) for i, p in mine]
        except PairError as err:
            failure = err
        failed = rank_failures(failure)  # every rank gets the same answer
        if failed:
            raise failure or RuntimeError(f"stopped: other ranks failed: {failed}")
        summaries = gather_in_order(done, len(pairs))
        if summaries is not None:  # rank 0
            write_summary(summaries)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from monai_icon.engines.distributed import (
    TorchrunEnv,
    destroy_process_group,
    init_process_group,
    is_main_process,
    rank_device,
    torchrun_env,
)

__all__ = [
    "PairError",
    "SHARE_TIMEOUT",
    "TorchrunEnv",
    "destroy_process_group",
    "gather_in_order",
    "init_process_group",
    "is_main_process",
    "process_group",
    "rank_device",
    "rank_failures",
    "run_pair",
    "shard_pairs",
    "torchrun_env",
]

T = TypeVar("T")

#: how long :func:`process_group`'s collectives wait for the slowest rank's share of the pairs
SHARE_TIMEOUT = timedelta(days=1)


def shard_pairs(items: Sequence[T], rank: int, world_size: int) -> list[tuple[int, T]]:
    """The items that process ``rank`` of ``world_size`` handles, with their indices in ``items``: every
    ``world_size``-th item from index ``rank`` (round robin, so that a datalist sorted by size or subject is spread
    evenly), in their original order. Over all ranks each item comes exactly once; a rank may get none.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``0 .. world_size - 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of world_size {world_size}.")
    return [(index, items[index]) for index in range(rank, len(items), world_size)]


def gather_in_order(local: Sequence[tuple[int, Any]], total: int, dst: int = 0) -> list[Any] | None:
    """Collect every rank's ``(index, value)`` pairs (values picklable, e.g. JSON-able summaries) on rank ``dst``
    and return the ``total`` values in index order there (``None`` on the other ranks). Every rank of the started
    process group must call it; in a single process (no group) the values are returned sorted by index.

    Raises:
        ValueError: on ``dst``, when the indices of all ranks are not ``0 .. total - 1``, each exactly once (a
            shard lost or done twice).
    """
    items = list(local)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank = dist.get_rank()
        gathered: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
        dist.gather_object(items, gathered, dst=dst)
        if rank != dst:
            return None
        assert gathered is not None
        items = [item for part in gathered for item in part]
    indices = sorted(index for index, _ in items)
    if indices != list(range(total)):
        seen = set(indices)
        missing = sorted(set(range(total)) - seen)[:5]
        repeated = sorted({i for i in indices if indices.count(i) > 1})[:5]
        raise ValueError(f"gathered {len(indices)} results for {total} pairs (missing indices {missing}, repeated "
                         f"{repeated}): every pair must be done exactly once.")
    return [value for _, value in sorted(items, key=lambda item: item[0])]


def rank_failures(failure: BaseException | str | None) -> dict[int, str]:
    """Every rank's failure, by rank: this process's ``failure`` (an exception or a message; ``None`` when its
    share finished) shared with all the others, so that every rank can decide the same way whether to go on. Every
    rank of the started process group must call it; in a single process it is ``{0: message}`` or ``{}``."""
    message = None if failure is None else str(failure) or type(failure).__name__
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    else:
        messages = [message]
    return {rank: text for rank, text in enumerate(messages) if text is not None}


class PairError(RuntimeError):
    """A pair failed in one process of several: its ``pair_id``, the ``rank`` it ran on and the original error (also
    the exception's ``__cause__``)."""

    def __init__(self, pair_id: str, rank: int, world_size: int, error: BaseException) -> None:
        self.pair_id, self.rank, self.world_size, self.error = pair_id, rank, world_size, error
        where = f" on rank {rank} of {world_size}" if world_size > 1 else ""
        super().__init__(f"pair {pair_id!r} failed{where}: {type(error).__name__}: {error}")


def run_pair(fn: Callable[..., T], pair_id: str, *args: Any, env: TorchrunEnv | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` for the pair ``pair_id``; any exception it raises comes back as a
    :class:`PairError` naming the pair and this process's rank (``env``, default: :func:`torchrun_env`), chained to
    the original. ``KeyboardInterrupt`` and ``SystemExit`` pass unchanged."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        env = torchrun_env() if env is None else env
        raise PairError(pair_id, env.rank, env.world_size, err) from err


@contextmanager
def process_group(device: str | torch.device, timeout: timedelta = SHARE_TIMEOUT) -> Iterator[TorchrunEnv]:
    """Start the process group for this ``torchrun`` process (:func:`init_process_group`: NCCL on a CUDA
    ``device``, gloo otherwise; nothing in a single process), yield this process's :class:`TorchrunEnv` and end the
    group afterwards: after all ranks arrive when the block finished, at once when it raised (the other ranks may
    never arrive; ``torchrun`` stops them). ``timeout``: how long a collective waits for the other ranks; the
    ranks meet only after their whole shares (:func:`rank_failures`, :func:`gather_in_order`), so a rank that
    finished early or failed may wait for hours."""
    started = init_process_group(device, timeout=timeout)
    try:
        yield torchrun_env()
    except BaseException:
        if started:
            destroy_process_group(barrier=False)
        raise
    if started:
        destroy_process_group(barrier=True)
