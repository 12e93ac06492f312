"""Micro-batches through megatron-core's forward-backward schedule (1F1B with pipeline parallelism).

``loss_fn(logits_shard, micro_batch) -> (loss, metrics)`` runs on the last pipeline stage; its loss is already
normalised globally (by the whole batch's token count), so the schedule is told not to rescale it
(``calculate_per_token_loss=True`` with a token count of 1: megatron-core then neither divides by the token count nor
by the number of micro-batches).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lampo.record import TokenBatch

LossFn = Callable[[Tensor, TokenBatch], tuple[Tensor, dict[str, Any]]]


def run_schedule(model: torch.nn.Module, micro_batches: list[TokenBatch], loss_fn: LossFn, *,
                 forward_only: bool) -> list[dict[str, Any]]:
    """Run every micro-batch forward (and backward unless ``forward_only``); gradients accumulate in ``.grad``.

    Returns the metrics of each micro-batch, in order, on the last pipeline stage, and ``[]`` on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model.config
    config.calculate_per_token_loss = True
    one = torch.ones((), dtype=torch.int, device=micro_batches[0].input_ids.device)
    # sequence parallelism splits the sequence over TP ranks: pad it to a multiple of TP (right padding is inert)
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1

    def forward_step(data_iterator, model_chunk):
        mb: TokenBatch = next(data_iterator)
        _, t = mb.input_ids.shape
        ids = F.pad(mb.input_ids, (0, -t % multiple))  # (b, T') with T' a multiple of `multiple`
        position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # right padding: 0..T'-1
        output = model_chunk(ids, position_ids, None)  # last stage: (b, T', Vp/tp); else hidden states

        def loss_func(logits: Tensor):
            loss, metrics = loss_fn(logits[:, :t], mb)
            return loss, one, metrics

        return output, loss_func

    seq_len = max(-(-mb.input_ids.shape[1] // multiple) * multiple for mb in micro_batches)
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_len,
        micro_batch_size=max(len(mb) for mb in micro_batches), forward_only=forward_only,
    )
    return list(out) if out else []


def broadcast_from_last_stage(value: Any, shape: tuple[int, ...] | None = None) -> Any:
    """Give every pipeline stage the last stage's ``value``: a float tensor of known ``shape``, or (``shape=None``)
    any picklable object."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
    if shape is None:
        box = [value]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = value.to(device).contiguous() if value is not None else torch.empty(shape, dtype=torch.float32, device=device)
    dist.broadcast(t, src=src, group=group)
    return t.cpu()
