"""Gradient reductions after the forward-backward schedule, for any TP x PP x DP (each a no-op at degree 1)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.backends.megatron_backend.optim import MasterWeights
from pipeline.backends.megatron_backend.parallel import Layout

TIED_COPY = "output_layer.weight"  # with tied embeddings and pp > 1: the last stage's copy of the embedding
EMBEDDING = "embedding.word_embeddings.weight"


def _tied_name(model: torch.nn.Module) -> str | None:
    """The name of this rank's half of a tied embedding split across pipeline stages, or None."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1 or not getattr(model, "tied_across_stages", False):
        return None
    if not ps.is_rank_in_embedding_group():
        return None
    return EMBEDDING if ps.is_pipeline_first_stage() else TIED_COPY


def _partial_over_tp(name: str, p: Tensor) -> bool:
    """Replicated parameters whose gradient each TP rank only sees part of: QK-norm weights (shared by all heads,
    each rank holds some heads) and, with sequence parallelism, norms (each rank holds part of the sequence). Their
    gradients are summed over the TP group, as megatron-core's ``finalize_model_grads`` does."""
    return "q_layernorm" in name or "k_layernorm" in name or getattr(p, "sequence_parallel", False)


def sync_grads(model: torch.nn.Module, layout: Layout, master: MasterWeights) -> None:
    """Sum gradients of partially-seen replicated parameters over TP ranks, over data-parallel replicas, and over
    the two copies of a stage-split tied embedding.

    The gradients reduced are the masters' (``master.grad``): fp32 sums over the micro-batches also when the model is
    bf16 (:mod:`.optim`), so every reduction runs in fp32. Call after :meth:`MasterWeights.grads_to_master`.
    """
    from megatron.core import parallel_state as ps

    if layout.tp > 1:
        for name, p, m in master.pairs:
            if m.grad is not None and _partial_over_tp(name, p):
                dist.all_reduce(m.grad, group=ps.get_tensor_model_parallel_group())
    if layout.dp > 1:
        group = ps.get_data_parallel_group()
        for _, _, m in master.pairs:
            if m.grad is not None:
                dist.all_reduce(m.grad, group=group)
    tied_name = _tied_name(model)
    if tied_name is not None:
        tied = next(m for name, _, m in master.pairs if name == tied_name)
        if tied.grad is None:
            tied.grad = torch.zeros_like(tied)
        dist.all_reduce(tied.grad, group=ps.get_embedding_group())


def _counted(name: str, p: Tensor, tp_rank: int, first_stage: bool, tied_across_stages: bool) -> bool:
    """Whether ``p``'s gradient enters the global norm on this rank (each distinct parameter exactly once)."""
    if "layernorm" in name and tp_rank != 0:
        # replicated over TP ranks. Decided by name: megatron-core sets ``tensor_model_parallel`` only in its weight
        # initialisers, which are skipped because weights come from a checkpoint. Every other parameter of the
        # mapped model (embedding, QKV weight and bias, projections, output layer) is split across TP ranks.
        return False
    return not (tied_across_stages and name == TIED_COPY and not first_stage)  # the embedding: on the first stage


def clip_grad_norm(named_params: list[tuple[str, Tensor]], max_norm: float, *, tied_across_stages: bool) -> Tensor:
    """Global L2 norm of the gradients of ``named_params`` (model parameter names, or their fp32 masters) over all
    model-parallel ranks, then scale them like ``torch.nn.utils.clip_grad_norm_``."""
    from megatron.core import parallel_state as ps

    tp_rank, first = ps.get_tensor_model_parallel_rank(), ps.is_pipeline_first_stage()
    tied = tied_across_stages
    named = [(n, p) for n, p in named_params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=named[0][1].device if named else "cpu")
    for n, p in named:
        if _counted(n, p, tp_rank, first, tied):
            sq += p.grad.float().pow(2).sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for _, p in named:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm
