"""Test helpers: tiny random HF checkpoints, and running a function in N processes (gloo on CPU; NCCL when there
are at least N GPUs)."""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

FAMILIES = ("qwen2", "qwen3", "llama", "phi3")


def hf_config(family: str, *, tied: bool, vocab: int = 99, layers: int = 2):
    """A tiny config; vocab 99 is odd so that padding to a multiple of TP is exercised."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tied,
                  rms_norm_eps=1e-6)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if family == "llama":  # Llama 3 style: scaled RoPE
        return LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                           rope_theta=500000.0, **common)
    if family == "phi3":
        return Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    raise ValueError(family)


def make_checkpoint(path: Path, family: str = "qwen2", *, tied: bool = True, seed: int = 0, layers: int = 2) -> Path:
    """Save a randomly initialised model; norms and biases are randomised too so that no mapping hides behind 1s/0s."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, tied=tied, layers=layers), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world  # else: CPU and gloo
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` spawned gloo processes; return each rank's return value, in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(fn, world, _free_port(), out, args), nprocs=world, start_method="spawn")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]
