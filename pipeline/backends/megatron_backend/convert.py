"""Weight conversion between Hugging Face decoder state dicts and megatron-core ``GPTModel`` shards, any TP x PP.

Layout facts (megatron-core local spec, 0.16):

* ``linear_qkv.weight`` ``((nq + 2 * ng) * hd / tp, H)``: rows grouped per key/value head (query group) ``g`` as
  ``[q heads of g (nq/ng * hd rows), k_g (hd rows), v_g (hd rows)]``; tensor parallelism takes ``ng / tp`` whole
  groups per rank. The QKV bias follows the same row layout.
* ``linear_fc1.weight`` ``(2 * I / tp, H)``: SwiGLU's gate and up projections are each split across ranks, then the
  rank's gate rows come before its up rows (megatron applies ``silu(first half) * second half``).
* ``linear_proj`` / ``linear_fc2``: row-parallel, split along the input (second) dimension.
* ``embedding.word_embeddings`` / ``output_layer``: vocabulary padded with zero rows to a multiple of ``tp``, then
  split along rows. With tied embeddings and ``pp > 1`` the last stage holds its own copy in ``output_layer``.
* Pipeline stage ``s`` of ``pp`` holds HF layers ``[s * L/pp, (s + 1) * L/pp)`` as local ``decoder.layers.0..``.

Phi-3 stores q/k/v fused (``qkv_proj``: all q rows, then k, then v) and gate/up fused (``gate_up_proj``: gate rows
first); they are split into the Llama names first and fused back last.

Every transformation is a reshape, slice, concatenation or zero-pad, so HF -> Megatron -> HF is bit-exact.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from pipeline.backends.megatron_backend.model import Arch

_ATTN = "self_attention"
#: per-layer tensors copied unchanged (replicated over tensor-parallel ranks): megatron suffix -> HF suffix
_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    f"{_ATTN}.q_layernorm.weight": "self_attn.q_norm.weight",
    f"{_ATTN}.k_layernorm.weight": "self_attn.k_norm.weight",
}


def stage_layers(arch: Arch, pp: int, pp_rank: int) -> range:
    """Global (HF) layer indices held by pipeline stage ``pp_rank``."""
    n = arch.num_layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


# ---------------------------------------------------------------------------------------------------------------------
# one layer: HF tensors (prefix-free) <-> the list of its tensor-parallel shards (megatron local suffixes)


def _qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, arch: Arch, tp: int) -> list[Tensor]:
    """q ``(nq*hd, ...)``, k/v ``(ng*hd, ...)`` -> ``tp`` shards ``((nq+2ng)*hd/tp, ...)`` (weights or biases)."""
    ng, hd, per = arch.num_kv_heads, arch.head_dim, arch.num_heads // arch.num_kv_heads
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(ng, per * hd, *rest), k.reshape(ng, hd, *rest), v.reshape(ng, hd, *rest)], dim=1)
    return [s.reshape(-1, *rest) for s in fused.chunk(tp, dim=0)]  # whole query groups per rank


def _qkv_to_hf(shards: list[Tensor], arch: Arch) -> tuple[Tensor, Tensor, Tensor]:
    ng, hd, per = arch.num_kv_heads, arch.head_dim, arch.num_heads // arch.num_kv_heads
    rest = shards[0].shape[1:]
    fused = torch.cat(shards, dim=0).reshape(ng, (per + 2) * hd, *rest)
    q, k, v = fused.split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _unfuse_phi3(layer: Mapping[str, Tensor], arch: Arch) -> dict[str, Tensor]:
    """Phi-3 layer -> Llama names: ``qkv_proj`` rows are all q, then k, then v; ``gate_up_proj`` is gate then up."""
    out = {k: v for k, v in layer.items() if k not in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")}
    q_rows, kv_rows = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    q, k, v = layer["self_attn.qkv_proj.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
    out["self_attn.q_proj.weight"], out["self_attn.k_proj.weight"], out["self_attn.v_proj.weight"] = q, k, v
    out["mlp.gate_proj.weight"], out["mlp.up_proj.weight"] = layer["mlp.gate_up_proj.weight"].chunk(2, dim=0)
    return out


def _fuse_phi3(layer: dict[str, Tensor]) -> dict[str, Tensor]:
    qkv = [layer.pop(f"self_attn.{x}_proj.weight") for x in "qkv"]
    layer["self_attn.qkv_proj.weight"] = torch.cat(qkv, dim=0).contiguous()
    gate_up = [layer.pop("mlp.gate_proj.weight"), layer.pop("mlp.up_proj.weight")]
    layer["mlp.gate_up_proj.weight"] = torch.cat(gate_up, dim=0).contiguous()
    return layer


def layer_to_megatron(hf: Mapping[str, Tensor], arch: Arch, tp: int) -> list[dict[str, Tensor]]:
    """One HF layer (keys like ``self_attn.q_proj.weight``) -> ``tp`` dicts of megatron local suffixes."""
    if arch.model_type == "phi3":
        hf = _unfuse_phi3(hf, arch)
    out: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    a = "self_attn."
    parts = {"weight": _qkv_to_megatron(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"],
                                        arch, tp)}
    if arch.qkv_bias:
        parts["bias"] = _qkv_to_megatron(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], arch, tp)
    gate, up = hf["mlp.gate_proj.weight"].chunk(tp, dim=0), hf["mlp.up_proj.weight"].chunk(tp, dim=0)
    proj = hf[a + "o_proj.weight"].chunk(tp, dim=1)
    down = hf["mlp.down_proj.weight"].chunk(tp, dim=1)
    for r in range(tp):
        for kind, shards in parts.items():
            out[r][f"{_ATTN}.linear_qkv.{kind}"] = shards[r]
        out[r][f"{_ATTN}.linear_proj.weight"] = proj[r]
        out[r]["mlp.linear_fc1.weight"] = torch.cat([gate[r], up[r]], dim=0)
        out[r]["mlp.linear_fc2.weight"] = down[r]
        for meg, name in _NORMS.items():
            if name in hf:
                out[r][meg] = hf[name]
    return [{k: v.contiguous() for k, v in d.items()} for d in out]


def layer_to_hf(shards: list[Mapping[str, Tensor]], arch: Arch) -> dict[str, Tensor]:
    """Inverse of :func:`layer_to_megatron`: the ``tp`` shards of one layer, in rank order -> HF suffixes."""
    a = "self_attn."
    hf: dict[str, Tensor] = {}
    kinds = ("weight", "bias") if arch.qkv_bias else ("weight",)
    for kind in kinds:
        q, k, v = _qkv_to_hf([s[f"{_ATTN}.linear_qkv.{kind}"] for s in shards], arch)
        hf[f"{a}q_proj.{kind}"], hf[f"{a}k_proj.{kind}"], hf[f"{a}v_proj.{kind}"] = q, k, v
    hf[a + "o_proj.weight"] = torch.cat([s[f"{_ATTN}.linear_proj.weight"] for s in shards], dim=1)
    fc1 = [s["mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards]
    hf["mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1], dim=0)
    hf["mlp.up_proj.weight"] = torch.cat([u for _, u in fc1], dim=0)
    hf["mlp.down_proj.weight"] = torch.cat([s["mlp.linear_fc2.weight"] for s in shards], dim=1)
    for meg, name in _NORMS.items():
        if meg in shards[0]:
            hf[name] = shards[0][meg]
    hf = {k: v.contiguous() for k, v in hf.items()}
    return _fuse_phi3(hf) if arch.model_type == "phi3" else hf


def vocab_to_megatron(w: Tensor, arch: Arch, tp: int) -> list[Tensor]:
    """``(V, H)`` -> ``tp`` shards of the zero-padded ``(Vp, H)``."""
    pad = arch.padded_vocab(tp) - w.shape[0]
    if pad:
        w = torch.cat([w, w.new_zeros(pad, *w.shape[1:])], dim=0)
    return [s.contiguous() for s in w.chunk(tp, dim=0)]


def vocab_to_hf(shards: list[Tensor], arch: Arch) -> Tensor:
    return torch.cat(shards, dim=0)[: arch.vocab_size].contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# whole checkpoints


def hf_to_megatron(hf: Mapping[str, Tensor], arch: Arch, tp: int, pp: int, tp_rank: int, pp_rank: int
                   ) -> dict[str, Tensor]:
    """The parameters of megatron rank ``(tp_rank, pp_rank)`` (names as in ``GPTModel.named_parameters()``)."""
    out: dict[str, Tensor] = {}
    first, last = pp_rank == 0, pp_rank == pp - 1
    if first:
        out["embedding.word_embeddings.weight"] = vocab_to_megatron(hf["model.embed_tokens.weight"], arch, tp)[tp_rank]
    for local, i in enumerate(stage_layers(arch, pp, pp_rank)):
        prefix = f"model.layers.{i}."
        layer = {k[len(prefix):]: v for k, v in hf.items() if k.startswith(prefix)}
        for k, v in layer_to_megatron(layer, arch, tp)[tp_rank].items():
            out[f"decoder.layers.{local}.{k}"] = v
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not arch.tie_word_embeddings:
            out["output_layer.weight"] = vocab_to_megatron(hf["lm_head.weight"], arch, tp)[tp_rank]
        elif not first:  # tied, pp > 1: the last stage keeps its own copy of the embedding
            out["output_layer.weight"] = vocab_to_megatron(hf["model.embed_tokens.weight"], arch, tp)[tp_rank]
    return out


_LOCAL_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def megatron_to_hf(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], arch: Arch, tp: int, pp: int
                   ) -> dict[str, Tensor]:
    """Merge all ``tp * pp`` shards, keyed ``(tp_rank, pp_rank)``, into one HF state dict (no ``lm_head`` when
    embeddings are tied, as ``save_pretrained`` writes it)."""
    hf: dict[str, Tensor] = {}
    hf["model.embed_tokens.weight"] = vocab_to_hf([shards[r, 0]["embedding.word_embeddings.weight"]
                                                   for r in range(tp)], arch)
    for s in range(pp):
        for local, i in enumerate(stage_layers(arch, pp, s)):
            layer = [{m.group(2): v for k, v in shards[r, s].items()
                      if (m := _LOCAL_LAYER.fullmatch(k)) and int(m.group(1)) == local} for r in range(tp)]
            hf.update({f"model.layers.{i}.{k}": v for k, v in layer_to_hf(layer, arch).items()})
    hf["model.norm.weight"] = shards[0, pp - 1]["decoder.final_layernorm.weight"]
    if not arch.tie_word_embeddings:
        hf["lm_head.weight"] = vocab_to_hf([shards[r, pp - 1]["output_layer.weight"] for r in range(tp)], arch)
    return hf
