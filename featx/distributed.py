"""Running as one of several processes: torchrun's ranks, or jobs that share a folder.

featx scales out on torch.distributed, not on a scheduler of its own.  Under ``torchrun``
(``WORLD_SIZE`` > 1 in the environment) each process is a rank of a gloo process group used
only for control: checks at start-up that every rank can run (its device, the shared output
folder), and one barrier before the file is assembled.  During the run no rank waits for
another; the work itself is coordinated through the files (see :mod:`featx.store`).

A :class:`World` can also be given by hand (rank and size, no process group), e.g. for a
Slurm job array: then the processes never talk, and the last one to finish assembles.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from featx.errors import EveryRankError, FeatxError

# the barrier before assembly waits for the slowest rank: a long extraction must not time out
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank on this node (its GPU under torchrun)
    local_size: int = 1  # processes on this node (they share its CPU cores)
    collective: bool = False  # a torch.distributed process group connects the ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """The world torchrun describes in the environment (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", "1")), collective=True)


@contextlib.contextmanager
def session(world: World | None):
    """Yield the world to run in, with a gloo process group when torchrun started us."""
    world = world or from_env()
    if not world.collective:
        yield world
        return
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield world
    finally:
        if started:
            dist.destroy_process_group()


def agree(world: World, error: str | None) -> None:
    """Every rank says whether it can go on; if one cannot, all stop with its reason.

    Without a process group this raises only this process's own error.
    """
    if not world.collective:
        if error:
            raise FeatxError(error)
        return
    import torch.distributed as dist

    errors: list = [None] * world.size
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        more = f" ({len(failed) - 1} other rank(s) failed too)" if len(failed) > 1 else ""
        raise EveryRankError(f"rank {r} of {world.size} cannot run: {e}{more}")


def broadcast(world: World, obj):
    """Rank 0's ``obj`` on every rank."""
    if not world.collective:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.collective:
        import torch.distributed as dist

        dist.barrier()


def device_spec(world: World, spec: str) -> str:
    """``--device`` for this rank: under torchrun, ``auto`` and ``cuda`` mean the GPU of
    LOCAL_RANK; a node with fewer GPUs than ranks is an error naming both numbers."""
    if world.size == 1 or spec not in ("auto", "cuda"):
        return spec
    import torch

    if spec == "auto" and not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    if n == 0:
        raise FeatxError(f"--device {spec} asked for a GPU but torch sees none on {socket.gethostname()}; "
                         "use --device cpu.")
    if world.local_rank >= n:
        raise FeatxError(f"LOCAL_RANK {world.local_rank} on {socket.gethostname()} has no GPU of its own "
                         f"(the node has {n}); start at most {n} processes per node, or use --device cpu.")
    return f"cuda:{world.local_rank}"


def cpu_share(world: World, cores: int | None = None) -> int:
    """This process's share of the node's CPU cores (at least one)."""
    return max(1, (cores or os.cpu_count() or 1) // max(world.local_size, 1))

