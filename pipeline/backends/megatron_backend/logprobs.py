"""Per-token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits for its slice of the (padded) vocabulary, ``(b, s, Vp / tp)``. Log-probs come
from megatron-core's ``vocab_parallel_cross_entropy`` (three all-reduces of ``(b, s)`` tensors); entropy from the
same max-shifted exponentials: ``H = log Z - sum_v p_v (l_v - m)`` with ``Z`` and the weighted sum all-reduced over
the tensor-parallel group. Padding rows of the vocabulary (ids ``>= vocab_size``) are masked out first, so the result
is the distribution over the model's real vocabulary, as Hugging Face computes it. With ``tp == 1`` the same code
runs and the all-reduces are over a group of one.
"""
from __future__ import annotations

import torch
from torch import Tensor


def mask_padded_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Set logits of padding vocabulary rows (global id ``>= vocab_size``) to the dtype's minimum: ``(b, s, Vp/tp)``."""
    from megatron.core import parallel_state as ps

    part = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part
    if start + part <= vocab_size:
        return logits
    real = torch.arange(start, start + part, device=logits.device) < vocab_size  # (Vp/tp,)
    return torch.where(real, logits, torch.finfo(logits.dtype).min)


def vocab_parallel_logprobs(logits: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """``log p(targets)`` ``(b, s)`` from this rank's logit shard ``(b, s, Vp/tp)``; differentiable."""
    from megatron.core import tensor_parallel

    # megatron's cross entropy shifts and exponentiates its fp32 input in place: give it its own copy
    shard = mask_padded_vocab(logits.float(), vocab_size).clone()
    return -tensor_parallel.vocab_parallel_cross_entropy(shard, targets)


def vocab_parallel_entropy(logits: Tensor, vocab_size: int) -> Tensor:
    """Entropy ``(b, s)`` of the softmax over the full vocabulary from this rank's shard ``(b, s, Vp/tp)``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    shard = mask_padded_vocab(logits.float(), vocab_size)
    m = shard.detach().max(dim=-1, keepdim=True).values  # (b, s, 1): a shift, no gradient needed
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = shard - m
    e = shifted.exp()
    z = reduce_from_tensor_model_parallel_region(e.sum(-1))  # (b, s)
    ez = reduce_from_tensor_model_parallel_region((e * shifted).sum(-1))  # (b, s)
    return z.log() - ez / z


def aligned(per_position: Tensor, attention_mask: Tensor) -> Tensor:
    """Shift ``(b, T-1)`` quantities computed from logits at ``0..T-2`` to the token they score: ``(b, T)``, entry
    0 and padding are 0 (the layout of :class:`lampo.record.TokenBatch`)."""
    return torch.nn.functional.pad(per_position, (1, 0)) * attention_mask
