"""Moving Hugging Face weights into a built megatron model, and gathering them back out as full HF tensors."""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.backends.megatron_backend import convert
from pipeline.backends.megatron_backend.model import Arch
from pipeline.backends.megatron_backend.parallel import Layout


def read_hf_state(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of the ``*.safetensors`` files in checkpoint folder ``path`` (fp32 kept as stored)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(path)!r}; the megatron backend loads HF checkpoints "
                                "saved with safe_serialization=True")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_into(model: torch.nn.Module, hf_state: dict[str, Tensor], arch: Arch, tp: int, pp: int, tp_rank: int,
              pp_rank: int) -> dict[str, Tensor]:
    """Copy this rank's shard of ``hf_state`` into ``model``; every parameter must be filled, nothing left over.
    Returns the shard as read (full precision), by parameter name."""
    shard = convert.hf_to_megatron(hf_state, arch, tp, pp, tp_rank, pp_rank)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(shard)), sorted(set(shard) - set(params))
    if missing or unexpected:
        raise ValueError(f"weight conversion does not match the built model: missing {missing}, unexpected "
                         f"{unexpected}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != shard[name].shape:
                raise ValueError(f"{name}: checkpoint gives {tuple(shard[name].shape)}, model has {tuple(p.shape)}")
            p.copy_(shard[name])
    model.tied_across_stages = arch.tie_word_embeddings and pp > 1
    return shard


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def gather_hf(params: dict[str, Tensor], arch: Arch, layout: Layout, pp_rank: int, dp_rank: int, *,
              device: torch.device | None = None, ranks: Sequence[int] = (0,)) -> Iterator[tuple[str, Tensor]]:
    """Stream full HF tensors to the global ``ranks`` (default: rank 0), one layer at a time (a collective: every
    rank must iterate).

    Each step gathers the shards of one unit (embedding, one layer, final norm/head) from the ranks that hold it
    (data-parallel rank 0 of every TP rank of the owning stage) to each rank of ``ranks`` in turn (every rollout
    engine's leader, :mod:`pipeline.rollout.groups`), which merges them with :mod:`convert`; other ranks yield
    nothing. The tensors stay on the accelerator: only names, shapes and dtypes travel as a pickled
    object; the shards themselves go by point-to-point ``send``/``recv`` into buffers on ``device`` (rank 0's model
    device; default: where ``params`` live), and rank 0's own shards are used in place. So on CUDA the rollout engine
    is handed CUDA tensors (SGLang takes them by IPC handle) and nothing is copied through host memory; on CPU (gloo)
    the same code moves CPU tensors. A yielded tensor may share storage with a live parameter (a shard that needs no
    merging, e.g. a norm weight at TP=1), so callers copy what they keep past the next optimizer step.
    """
    from megatron.core import parallel_state as ps

    params = {k: v.detach() for k, v in params.items()}  # this rank's megatron parameters by name
    if device is None:
        device = next(iter(params.values())).device if params else torch.device("cpu")
    rank = dist.get_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    owner = dp_rank == 0
    per_stage = arch.num_layers // layout.pp

    def gather(local: dict[str, Tensor] | None) -> list[dict[str, Tensor]] | None:
        got = None
        for dst in ranks:  # the same order on every rank
            shards = gather_to(local, dst)
            got = shards if shards is not None else got
        return got

    def gather_to(local: dict[str, Tensor] | None, dst: int) -> list[dict[str, Tensor]] | None:
        sends = owner and local is not None
        meta = (rank, tp_rank, [(k, tuple(v.shape), v.dtype) for k, v in local.items()]) if sends else None
        out: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
        dist.gather_object(meta, out, dst=dst)
        if out is None:
            if sends:
                for v in local.values():  # in the order of `meta`
                    dist.send(v.contiguous(), dst=dst)
            return None
        by_tp: dict[int, dict[str, Tensor]] = {}
        for item in out:  # in rank order: each sender's send()s are matched in turn
            if item is None:
                continue
            src, src_tp, entries = item
            if src == dst:
                by_tp[src_tp] = dict(local)
                continue
            shards = {}
            for k, shape, dtype in entries:
                shards[k] = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(shards[k], src=src)
            by_tp[src_tp] = shards
        return [by_tp[r] for r in range(layout.tp)]

    first = gather({"e": params["embedding.word_embeddings.weight"]} if ps.is_pipeline_first_stage() else None)
    if first is not None:
        yield "model.embed_tokens.weight", convert.vocab_to_hf([s["e"] for s in first], arch)
    for i in range(arch.num_layers):
        mine = pp_rank == i // per_stage
        local = None
        if mine:
            prefix = f"decoder.layers.{i % per_stage}."
            local = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        shards = gather(local)
        if shards is not None:
            for k, v in convert.layer_to_hf(shards, arch).items():
                yield f"model.layers.{i}.{k}", v
    last = None
    if ps.is_pipeline_last_stage():
        last = {"norm": params["decoder.final_layernorm.weight"]}
        if not arch.tie_word_embeddings:
            last["head"] = params["output_layer.weight"]
    shards = gather(last)
    if shards is not None:
        yield "model.norm.weight", shards[0]["norm"]
        if not arch.tie_word_embeddings:
            yield "lm_head.weight", convert.vocab_to_hf([s["head"] for s in shards], arch)
