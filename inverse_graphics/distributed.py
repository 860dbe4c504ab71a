"""torch.distributed for training: the process group torchrun asks for, and the few collectives the engine needs.

A process started by torchrun (`torchrun --nproc-per-node N -m inverse_graphics train ...`) finds RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous in its environment; `setup` joins the group with gloo on the CPU and NCCL on CUDA (one
device per rank: cuda:LOCAL_RANK). A process not started by torchrun gets `Dist()` (rank 0 of 1) and every helper
here is then the identity, so single-process training runs exactly the code it ran before distribution existed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank (0 writes everything), world size, rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when `setup` created the process group (and `teardown` should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether collectives are needed (more than one process)."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def restart_count() -> int:
    """How often torchrun (--max-restarts) has restarted this job's workers; 0 outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def setup(device: str) -> Dist:
    """Join (or reuse) the process group when launched by torchrun; `Dist()` otherwise. device: the run's device
    ("cpu", "cuda"): NCCL with cuda:LOCAL_RANK made current, else gloo."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_by_torchrun():
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices here")
        torch.cuda.set_device(local_rank)
    # torchrun's store can outlive a restart (--max-restarts) with the previous attempt's keys in it, among them the
    # address of a dead rank's gloo socket; a prefix per attempt keeps each attempt's keys apart.
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = dist.PrefixStore(f"inverse-graphics/attempt{restart_count()}/", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=attempt, rank=rank, world_size=world_size)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """The device collectives run on: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (a new tensor on t's device); `t` itself with one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = t.detach().to(_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_reduce_max(values: list[float]) -> list[float]:
    """The element-wise maximum over ranks of a few numbers (float64)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Per-key means over ranks of float statistics (every rank must pass the same keys)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).cpu().tolist()))


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (any picklable object; pickled only between this job's own processes)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result to every rank; an exception it raises (ValueError and the
    project's own errors) is raised on every rank, so that all stop with the same message instead of hanging."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    result: tuple[Any, BaseException | None] = (None, None)
    if dist.get_rank() == 0:
        try:
            result = (fn(), None)
        except Exception as exc:  # handed to every rank below, then raised there
            result = (None, exc)
    value, error = broadcast(result)
    if error is not None:
        raise error
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
