"""Data parallelism under torchrun: every rank scans its own shard, then ranks merge.

`torchrun --nproc-per-node G -m gatescope scan ...` starts G processes with RANK and
WORLD_SIZE set; :func:`process_group` makes the process group (NCCL on GPUs, gloo on CPUs)
unless the caller made one already. At the end every rank gathers every other rank's
statistics, one layer at a time (so memory holds one layer of all ranks, not all layers),
and merges them in rank order: each rank ends with the same atlas, and rank 0 writes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from gatescope.errors import GatescopeError

__all__ = ["Ranks", "barrier", "gather_merged", "on_rank_zero", "process_group"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int  # this process's GPU on its node
    owns_group: bool  # whether gatescope made the process group (and so destroys it)

    @property
    def device(self) -> torch.device:
        """The rank's device: its node's GPU number ``local_rank``, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


@contextlib.contextmanager
def process_group() -> Iterator[Ranks | None]:
    """This process's place among the ranks (None when it runs alone); a process group
    made here is destroyed on the way out, whatever happens meanwhile."""
    ranks = _join()
    try:
        yield ranks
    finally:
        if ranks is not None and ranks.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _join() -> Ranks | None:
    """This process's place among the ranks, or None when it runs alone."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return None
        return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_available():
        raise GatescopeError("this PyTorch build has no torch.distributed: run one process.")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def on_rank_zero(ranks: Ranks | None, work: Callable[[], T]) -> T:
    """Runs ``work`` on rank 0 only and hands its result, or its GatescopeError, to every
    rank: the others never wait forever on a rank that has stopped."""
    if ranks is None:
        return work()
    import torch.distributed as dist

    box: list[object] = [None]
    if ranks.rank == 0:
        try:
            box[0] = ("ok", work())
        except GatescopeError as error:
            box[0] = ("error", str(error))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise GatescopeError(value)
    return value


def barrier(ranks: Ranks | None) -> None:
    if ranks is not None:
        import torch.distributed as dist

        dist.barrier()


def gather_merged(ranks: Ranks, layers: list):
    """Every layer's statistics merged over all ranks (in rank order), on every rank."""
    import torch.distributed as dist

    from gatescope.stats import NeuronStats

    merged = []
    for stats in layers:
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks.world)]
        for name, tensor in stats.state_dict().items():
            flat = tensor.contiguous().reshape(-1)  # 0-d tensors do not travel everywhere
            gathered = [torch.empty_like(flat) for _ in range(ranks.world)]
            dist.all_gather(gathered, flat)
            for state, received in zip(per_rank, gathered, strict=True):
                state[name] = received.view(tensor.shape)
        merged.append(NeuronStats.from_states(per_rank, device=stats.device))
    return merged
