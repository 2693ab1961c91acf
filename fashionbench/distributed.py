"""More than one process or GPU: data-parallel training under torchrun, one GPU per run.

Under `torchrun --nproc_per_node N`, the N processes train one run together. Each holds the
whole training split, draws the same seeded permutation and augments the same global batch
(the recipe's `batch_size`), then trains on its 1/N slice; DDP averages the gradients. So N
processes follow the single-process run with the same global batch: equal up to float
summation order for models without batch norm, or with `sync_bn` on CUDA. Only rank 0 writes
outputs, checkpoints and curves.

Without torchrun, a process on a machine with several GPUs takes the first one no other
training process holds (a lock file per GPU, held until the process exits), so
`dvc queue start -j N` on N GPUs runs each worker's experiment on its own GPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fashionbench.errors import UserError

log = logging.getLogger(__name__)


class DistributedError(UserError):
    """A data-parallel run that cannot work as configured."""


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel run; Group() is a single process."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints and logs."""
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """This process's contiguous 1/world slice of a global batch (dim 0)."""
        if self.world == 1:
            return batch
        size = len(batch) // self.world
        return batch[self.rank * size:(self.rank + 1) * size]

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over all processes (the tensor itself for one process)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every process (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def is_main() -> bool:
    """Whether this process writes outputs: always without torchrun, rank 0 under it (readable
    before the process group starts)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device, batch_size: int) -> Group:
    """Join the process group the launcher set up (NCCL on CUDA, gloo on the CPU)."""
    if not launched():
        return Group()
    world = int(os.environ["WORLD_SIZE"])
    if batch_size % world:
        raise DistributedError(f"batch_size {batch_size} does not split over {world} processes: "
                               f"use a multiple of {world} (the global batch stays the recipe's)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=
                                device if device.type == "cuda" else None)
    return Group(dist.get_rank(), dist.get_world_size())


def wrap(model: nn.Module, device: torch.device, group: Group, sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the module whose forward averages gradients): the same module
    for one process; with several, batch norm synchronised when asked (CUDA only) and DDP."""
    if group.world == 1:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if sync_bn and has_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif group.is_main:
            log.warning("sync_bn needs CUDA: each process normalises its own slice of the batch")
    ids = [device.index] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


# ---------------------------------------------------------------- one GPU per training process

_held: dict[str, IO] = {}  # GPU id -> its open, locked file, for the life of the process


def lock_dir() -> Path:
    """Where GPU claims live: $FASHIONBENCH_GPU_LOCKS, else a folder in the system temp dir."""
    return Path(os.environ.get("FASHIONBENCH_GPU_LOCKS", Path(tempfile.gettempdir()) / "fashionbench-gpus"))


def gpu_ids() -> list[str]:
    """A stable id per visible GPU (its UUID), in index order."""
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def claim_gpu() -> int:
    """The index of the GPU this process trains on. Under torchrun: LOCAL_RANK. Otherwise the
    first visible GPU that no other process holds, locked until this process exits; when all
    are held, the one with the lowest index shared, with a warning."""
    if launched():
        return int(os.environ.get("LOCAL_RANK", "0"))
    ids = gpu_ids()
    if len(ids) <= 1:
        return 0
    for index, gpu in enumerate(ids):
        if gpu in _held:
            return index
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for index, gpu in enumerate(ids):
        handle = open(folder / f"{gpu}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held[gpu] = handle
        return index
    log.warning("all %d GPUs are held by other training processes: sharing GPU 0", len(ids))
    return 0


def release_gpus() -> None:
    """Give up this process's GPU claims (they also end with the process)."""
    while _held:
        _, handle = _held.popitem()
        handle.close()
