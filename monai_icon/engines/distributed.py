# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""Training and evaluating in several processes started by ``torchrun`` (PyTorch distributed).

``torchrun --nproc_per_node=N`` starts N copies of a program with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
their environment. The functions here read them (a plain ``python`` run is one process of rank 0), start and end the
process group (NCCL on GPUs, gloo on CPUs), pick each process's device and split the work:

* :func:`distributed_network`: the network in ``DistributedDataParallel`` (gradients averaged over the processes),
  its batch norm layers computing their statistics over the whole global batch (:func:`convert_batchnorm`);
* :func:`per_rank_batch`: the batch of one process, ``batch_size / world_size``, so that a setting keeps meaning the
  global batch and a run in N processes takes the steps of a one-process run with the same ``batch_size``;
* :class:`ShardSampler`: a contiguous part of an evaluation dataset per process, each item exactly once, so that
  metrics gathered over the processes (MONAI's cumulative metrics) come back in the dataset's order.

``bundle/knee3d_icon/configs/multi_gpu_train.yaml`` uses them; ``monai_icon.apps.distributed`` builds on them for
``monai-icon register-pairs``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from datetime import timedelta

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from monai_icon.backend import CPUBackend, as_backend
from monai_icon.config import as_bool

__all__ = [
    "DistributedBatchNorm",
    "ShardSampler",
    "TorchrunEnv",
    "convert_batchnorm",
    "destroy_process_group",
    "distributed_network",
    "init_process_group",
    "is_main_process",
    "per_rank_batch",
    "rank",
    "rank_device",
    "rank_seed",
    "shard_range",
    "torchrun_env",
    "unwrap",
    "world_size",
]


@dataclass(frozen=True)
class TorchrunEnv:
    """This process's place among those ``torchrun`` started: ``rank`` (0 .. ``world_size`` - 1, over all
    machines), ``world_size`` (number of processes) and ``local_rank`` (its index on this machine: its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and prints summaries."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv:
    """``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` of ``environ`` (default ``os.environ``), as ``torchrun`` sets
    them; without them a single process (rank 0 of 1). ``LOCAL_RANK`` defaults to ``RANK``.

    Raises:
        ValueError: a value that is not a whole number, or a rank outside ``0 .. WORLD_SIZE - 1``.
    """
    environ = os.environ if environ is None else environ

    def number(name: str, default: int) -> int:
        text = environ.get(name)
        if text is None or not str(text).strip():
            return default
        if not str(text).strip().isdigit():
            raise ValueError(f"{name} must be a whole number >= 0 (torchrun sets it), got {text!r}.")
        return int(text)

    world_size = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local_rank = number("LOCAL_RANK", rank)
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"RANK {rank} must be below WORLD_SIZE {world_size} (>= 1).")
    return TorchrunEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def _current() -> TorchrunEnv:
    """The started process group's rank and size, else the environment's."""
    if dist.is_available() and dist.is_initialized():
        return TorchrunEnv(dist.get_rank(), dist.get_world_size(), torchrun_env().local_rank)
    return torchrun_env()


def rank() -> int:
    """This process's rank: the started process group's, else ``RANK`` (0 in a single process)."""
    return _current().rank


def world_size() -> int:
    """The number of processes: the started process group's size, else ``WORLD_SIZE`` (1 in a single process)."""
    return _current().world_size


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true in a single process): the one that saves and prints."""
    return _current().is_main


def rank_seed(seed: int | str) -> int:
    """``seed + rank``: each process its own random draws (training pairs, augmentation), rank 0 the given seed."""
    return int(seed) + rank()


def rank_device(device: str | torch.device | None = None, env: TorchrunEnv | None = None) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when ``device`` is ``"cuda"`` (no index), or is ``None`` and a
    GPU is available; any other device as given (``"cpu"``, or ``"cuda:1"`` for every process).

    Raises:
        ValueError: CUDA asked for but not available, or ``LOCAL_RANK`` beyond this machine's GPUs.
    """
    env = torchrun_env() if env is None else env
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine.")
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {env.local_rank} has no GPU of its own ({torch.cuda.device_count()} here): "
                         "start at most one process per GPU (torchrun --nproc_per_node).")
    return torch.device("cuda", env.local_rank)


def init_process_group(device: str | torch.device, env: TorchrunEnv | None = None,
                       timeout: timedelta | None = None) -> bool:
    """Start the default process group when ``torchrun`` started several processes: NCCL when ``device`` is a
    CUDA device (made the current one first), gloo otherwise; the address comes from the environment that
    ``torchrun`` sets. Nothing happens in a single process or when a group is already started. ``timeout`` is how
    long a collective waits for the slowest process (``None``: PyTorch's default for the backend).

    Returns:
        whether it started a group (so the caller ends it with :func:`destroy_process_group`).
    """
    env = torchrun_env() if env is None else env
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not env.distributed or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    # Ignite (handlers, MONAI metrics) finds the group at its first `ignite.distributed` call with collectives of
    # its own (a gloo group, an all-reduce): made here, in every process at once, not where one rank alone calls it
    idist.sync()
    return True


def destroy_process_group(barrier: bool = True) -> None:
    """End the default process group if one is started; with ``barrier``, after every process has come here (a
    rank that ends the group while another still saves can abort in gloo's teardown). Leave ``barrier`` off when
    ending after an error: the other processes may never arrive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def per_rank_batch(batch_size: int | str, world_size: int | None = None) -> int:
    """The batch of each process when ``batch_size`` is the global batch of one optimiser step:
    ``batch_size / world_size`` (default: the started group's size, else ``WORLD_SIZE``).

    Raises:
        ValueError: ``batch_size`` not a positive multiple of the number of processes.
    """
    processes = _current().world_size if world_size is None else int(world_size)
    batch = int(batch_size)
    if batch < 1 or batch % processes:
        raise ValueError(f"batch_size {batch_size} is the global batch of one step, split evenly over the "
                         f"{processes} processes: give a multiple of {processes}.")
    return batch // processes


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` (what is saved, exported and evaluated),
    or ``network`` itself."""
    if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return network.module
    return network


def shard_range(length: int, rank: int, world_size: int) -> range:
    """The contiguous indices of ``range(length)`` that process ``rank`` of ``world_size`` takes: each index in
    exactly one part, parts in rank order, sizes differing by at most one (the first ``length % world_size`` ranks
    take one more)."""
    if world_size < 1 or not 0 <= rank < world_size or length < 0:
        raise ValueError(f"need 0 <= rank < world_size and length >= 0, got rank {rank}, world_size {world_size}, "
                         f"length {length}.")
    size, extra = divmod(length, world_size)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


class ShardSampler(Sampler[int]):
    """The items of a dataset that this process evaluates: :func:`shard_range` of its length for the process's
    rank, in order. Unlike ``DistributedSampler`` nothing is repeated to even out the parts (every item counts
    once in the metrics) and the parts are contiguous, so per-item values gathered in rank order (MONAI's
    cumulative metrics, ``MetricsSaver``) are in the dataset's order, as in a single process.

    Args:
        dataset: a sized dataset.
        rank, world_size: default: the started process group's (else ``torchrun``'s environment).

    Raises:
        ValueError: fewer items than processes (a process with nothing to evaluate would stall the others).
    """

    def __init__(self, dataset: Sized, rank: int | None = None, world_size: int | None = None) -> None:
        current = _current()
        rank = current.rank if rank is None else rank
        world_size = current.world_size if world_size is None else world_size
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} evaluation items cannot be shared by {world_size} processes: give at "
                             "least one per process (val_pairs) or start fewer processes.")
        self.indices = shard_range(len(dataset), rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch: each channel's mean and variance
    summed over all processes with a differentiable all-reduce (two passes: the mean, then the squared
    deviations), on any backend, gloo on CPUs included (``torch.nn.SyncBatchNorm`` needs GPUs). Running
    statistics are updated from the global values. Outside training, without a process group or in one process
    it is ``BatchNorm``. Same parameters, buffers and state-dict keys as ``BatchNorm1d/2d/3d``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions [B, C, ...], got {input.dim()}.")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        synced = (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        if not synced:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() // input.shape[1]], dtype=torch.float64, device=input.device)
        dist.all_reduce(count)
        total = float(count)
        mean = differentiable_all_reduce(input.sum(dims)) / total
        centred = input - mean.view(shape)
        var = differentiable_all_reduce((centred * centred).sum(dims)) / total
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (total / max(total - 1.0, 1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out


def convert_batchnorm(module: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """``module`` with every ``BatchNorm1d/2d/3d`` replaced by one that normalises with the statistics of the
    global batch: ``torch.nn.SyncBatchNorm`` on a CUDA ``device``, :class:`DistributedBatchNorm` otherwise. The
    parameter and buffer objects, training modes and state-dict keys are kept (an optimiser built before still
    holds the parameters; checkpoints load into the plain network). Returns ``module`` (or its replacement when
    ``module`` is itself a batch norm)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, DistributedBatchNorm):
        new = DistributedBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.training = module.training
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child, device))
    return module


def distributed_network(network: nn.Module, device: str | torch.device, sync_batchnorm: bool | str = True,
                        channels_last: bool | str = False, backend: CPUBackend | str | None = None) -> nn.Module:
    """``network`` on ``device`` for training in the started process group: its batch norm layers normalising
    over the global batch (:func:`convert_batchnorm`, with ``sync_batchnorm``; otherwise each process normalises
    its own part), its convolution weights channels-last (with ``channels_last``, or where the CPU backend
    ``backend``, a :class:`~monai_icon.backend.CPUBackend` or its mode, has it on ``device``; before the wrapping,
    so that the gradient buckets match them), wrapped in ``DistributedDataParallel`` (its own GPU,
    ``device_ids=[device]``, on CUDA). In a single process: ``network`` on ``device``, unwrapped."""
    from monai_icon.engines.trainer import to_channels_last

    device = torch.device(device)
    network = network.to(device)
    backend_channels_last = backend is not None and as_backend(backend).resolve(device).channels_last
    if as_bool(channels_last, "channels_last") or backend_channels_last:
        to_channels_last(network)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return network
    if as_bool(sync_batchnorm, "sync_batchnorm"):
        network = convert_batchnorm(network, device)
    return nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
