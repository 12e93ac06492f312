"""The few distributed facts the runner needs. One process is the degenerate case: every helper works without
``torch.distributed`` being initialised, so world size 1 goes through the same code as a torchrun launch."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import RunConfig


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


# How long a rank may wait in one collective before the process group (NCCL's watchdog) aborts the job. Set from
# ``run.collective_timeout_min`` by :func:`init`; the backends' own process-group inits read it from here, so every
# group this project creates (the default one, megatron-core's TP/PP/DP groups) gets the same bound.
_timeout: timedelta | None = None


def default_timeout_min() -> int:
    return RunConfig().collective_timeout_min


def collective_timeout() -> timedelta:
    """The configured collective timeout (``run.collective_timeout_min``; its default before :func:`init`)."""
    return _timeout if _timeout is not None else timedelta(minutes=default_timeout_min())


def collective_timeout_minutes() -> int:
    """:func:`collective_timeout` in whole minutes (megatron-core's ``distributed_timeout_minutes``), rounded up."""
    return max(1, -(-int(collective_timeout().total_seconds()) // 60))


def init(timeout_min: float | None = None) -> None:
    """Initialise the default process group when launched by torchrun (gloo on CPU, NCCL on GPU).

    ``timeout_min`` (``run.collective_timeout_min``) bounds every collective: ranks 1..N-1 wait in a broadcast or
    barrier while rank 0 alone generates a rollout or runs an evaluation, far longer than NCCL's default 10 minutes.
    None keeps the value set before (or the config default). Recorded even in one process, where no group is created.
    """
    global _timeout
    if timeout_min is not None:
        if timeout_min <= 0:
            raise ValueError(f"collective timeout {timeout_min} minutes must be positive")
        _timeout = timedelta(minutes=timeout_min)
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    init_process_group(use_cuda=torch.cuda.is_available())


def init_process_group(use_cuda: bool) -> None:
    """The one process-group init: join the ``torch.distributed`` group that torchrun describes (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), or start a one-process group on a free local port when they are absent (a backend
    built in a plain ``python`` process); no-op when a group exists already.

    NCCL on CUDA (after selecting the GPU of LOCAL_RANK), gloo on the CPU; the group gets the configured collective
    timeout (:func:`collective_timeout`). :func:`init` (the runner) calls it under torchrun, the backends always.
    """
    if dist.is_initialized():
        return
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if use_cuda else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        dist.init_process_group(backend, init_method="env://", timeout=collective_timeout())
        return
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=collective_timeout())


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled); identity in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order, on every rank; ``[obj]`` in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of any rank, on every rank: one all-reduce of a single integer (on the GPU under NCCL);
    ``value`` itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
