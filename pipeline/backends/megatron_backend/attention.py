"""Core attention for megatron-core's layer spec, built on ``torch.nn.functional.scaled_dot_product_attention``.

Replaces megatron-core's local ``DotProductAttention`` (explicit baddbmm + fused softmax, a global CUDA scratch
buffer, a CUDA-RNG fork around dropout). SDPA runs on CPU and GPU (flash / memory-efficient kernels) alike, so the
model is the same module on both. Causal masking only: sequences are right-padded, so a real token never attends to
padding and no explicit mask is needed (padding positions produce values that the losses mask out).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class SDPAttention(MegatronModule):
    """Drop-in for the ``core_attention`` submodule of megatron-core's ``SelfAttention`` (same constructor)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; set context_parallel_size=1")
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_size()
        self.heads = config.num_attention_heads // tp  # query heads on this rank
        self.groups = config.num_query_groups // tp  # key/value heads on this rank
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type=None, attention_bias: Tensor | None = None, packed_seq_params=None) -> Tensor:
        """query ``(sq, b, np, hn)``, key/value ``(sk, b, ng, hn)`` -> context ``(sq, b, np * hn)``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, hn)
        if self.heads != self.groups:  # grouped-query attention: query heads of group g are contiguous
            rep = self.heads // self.groups
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)  # (sq, b, np * hn)


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()
