"""Data parallelism under torchrun: every rank scans its own shard, then ranks merge.

`torchrun --nproc-per-node G -m gatescope scan ...` starts G processes with RANK and
WORLD_SIZE set; :func:`process_group` makes the process group (NCCL on GPUs, gloo on CPUs)
unless the caller made one already. At the end every rank gathers every other rank's
statistics, one layer at a time (so memory holds one layer of all ranks, not all layers),
and merges them in rank order: each rank ends with the same atlas, and rank 0 writes it.

Ranks never wait on one another while they scan, so a rank that fails would leave the others
waiting in the final gather. :class:`RankWatch` prevents that: a failing rank posts its
failure in the process group's store, the others read it between batches (and while they
wait for the rest to finish) and stop with a message.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import torch

from gatescope.errors import GatescopeError

if TYPE_CHECKING:
    from gatescope.stats import NeuronStats
    from gatescope.stats.routed import RoutedStats

__all__ = [
    "RankFailed",
    "RankWatch",
    "Ranks",
    "barrier",
    "gather_merged",
    "on_rank_zero",
    "process_group",
]

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

    box: list[tuple[T | None, str | None]] = [(None, None)]
    if ranks.rank == 0:
        try:
            box[0] = (work(), None)
        except GatescopeError as error:
            box[0] = (None, str(error))
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise GatescopeError(error)
    return value  # type: ignore[return-value]


class RankFailed(GatescopeError):
    """Another rank of the scan has failed; this one stops too."""


class RankWatch:
    """Tells the ranks of one scan that one of them has failed, without a collective.

    Used as a context manager around a rank's work: an exception leaving it is posted for
    the others (unless it is another rank's failure). :meth:`failure` is a cheap look at the
    store between batches; :meth:`wait_for_all` waits until every rank has finished its
    part, or one has failed. Without ranks (one process) it does nothing.
    """

    _POLL_SECONDS = 0.05

    def __init__(self, ranks: Ranks | None) -> None:
        self._ranks = ranks
        self._store = None
        if ranks is None:
            return
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        # A fresh key prefix per scan, so that scans in one process group do not mix.
        name: list[str | None] = [uuid.uuid4().hex if ranks.rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        # The group's own store: the one channel every rank can read without the others
        # taking part (torch keeps its getter private, as torch's own elastic tools use it).
        store = distributed_c10d._get_default_store()
        self._store = distributed_c10d.PrefixStore(f"gatescope/{name[0]}/", store)

    def failure(self) -> str | None:
        """The first failure another rank posted (``"rank 1: message"``), or None."""
        if self._store is None:
            return None
        try:
            if not self._store.check(["failed"]):
                return None
            return self._store.get("failed").decode()
        except RuntimeError as error:  # the store's host (rank 0's process) is gone
            return f"the process group's store stopped answering ({error})"

    def wait_for_all(self) -> None:
        """Returns once every rank has called it; raises :class:`RankFailed` as soon as a
        rank has posted a failure instead."""
        if self._store is None or self._ranks is None:
            return
        self._store.add("finished", 1)
        while True:
            failure = self.failure()
            if failure is not None:
                raise RankFailed(f"another rank failed ({failure}); this rank stops too.")
            if self._store.add("finished", 0) >= self._ranks.world:
                return
            time.sleep(self._POLL_SECONDS)

    def __enter__(self) -> RankWatch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None or self._store is None or self._ranks is None:
            return
        if isinstance(error, RankFailed):
            return
        message = f"rank {self._ranks.rank}: {str(error) or type(error).__name__}"
        with contextlib.suppress(RuntimeError):  # the store may be gone too
            self._store.set("failed", message)


def barrier(ranks: Ranks | None) -> None:
    if ranks is not None:
        import torch.distributed as dist

        dist.barrier()


def gather_merged(ranks: Ranks, layers: Sequence[NeuronStats | RoutedStats]) -> list[NeuronStats]:
    """Every layer's statistics merged over all ranks (in rank order), on every rank."""
    import torch.distributed as dist

    from gatescope.stats import NeuronStats

    merged: list[NeuronStats] = []
    for stats in layers:
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks.world)]
        for name, tensor in stats.state_dict().items():
            flat = tensor.contiguous().reshape(-1)  # 0-d tensors do not travel everywhere
            gathered = [torch.empty_like(flat) for _ in range(ranks.world)]
            dist.all_gather(gathered, flat)
            for state, received in zip(per_rank, gathered, strict=True):
                state[name] = received.view(tensor.shape)
        merged.append(NeuronStats.from_states(per_rank, device=stats.device, seed=stats.seed,
                                              layer=stats.layer))  # fmt: skip
    return merged
