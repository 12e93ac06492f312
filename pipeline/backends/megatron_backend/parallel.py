"""The parallel layout (TP x PP x DP) and bringing up megatron-core's process groups.

World size 1 with all degrees 1 goes through exactly this code (groups of one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from pipeline.dist import collective_timeout_minutes, init_process_group  # run.collective_timeout_min


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


def check_layout(layout: Layout, *, num_heads: int, num_kv_heads: int, num_layers: int, world_size: int) -> None:
    """Raise ``ValueError`` naming the numbers when the model or the world cannot be split this way."""
    tp, pp = layout.tp, layout.pp
    problems = []
    if num_heads % tp:
        problems.append(f"tensor_parallel={tp} does not divide {num_heads} attention heads")
    if num_kv_heads % tp:
        problems.append(f"tensor_parallel={tp} does not divide {num_kv_heads} key/value heads")
    if num_layers % pp:
        problems.append(f"pipeline_parallel={pp} does not divide {num_layers} layers")
    if world_size % (tp * pp):
        problems.append(f"world size {world_size} is not tensor_parallel x pipeline_parallel x data_parallel "
                        f"= {tp} x {pp} x DP for any whole DP")
    if problems:
        raise ValueError("; ".join(problems) + "; choose degrees that divide these numbers")


def layout_for_world(tp: int, pp: int, world_size: int) -> Layout:
    return Layout(tp, pp, max(1, world_size // (tp * pp)))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(layout: Layout, *, seed: int, use_cuda: bool) -> None:
    """Join (or create) the default process group, then megatron-core's TP/PP/DP groups.

    NCCL with CUDA, gloo on CPU (where :mod:`cpu_compat` is enabled first). A world of one without ``torchrun``
    gets a private single-process group, so the same code runs in a plain ``python`` process.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not use_cuda:
        from pipeline.backends.megatron_backend import cpu_compat

        cpu_compat.enable()
    init_process_group(use_cuda)
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"world size {dist.get_world_size()} is not tensor_parallel x pipeline_parallel x "
                         f"data_parallel = {layout.tp} x {layout.pp} x {layout.dp}")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()) != (
                layout.tp, layout.pp):
            raise RuntimeError("megatron-core parallel state is already initialised with another layout")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                     distributed_timeout_minutes=collective_timeout_minutes())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
