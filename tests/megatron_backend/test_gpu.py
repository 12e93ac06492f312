"""On a CUDA machine: the backend on one GPU with NCCL, fp32 parity with the torch backend, and a bf16 step time on
a model of a real small architecture's shape (Qwen2.5-0.5B's config with random weights: no hub access needed).

Skipped without CUDA. Not yet run (no GPU was available when it was written); ``-s`` prints the timings.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

from tests.megatron_backend.harness import make_checkpoint, run_distributed
from tests.megatron_backend.test_parallel import LR, assert_weights_close, make_batch, make_cfg, steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True,
                  rms_norm_eps=1e-6, rope_theta=1000000.0)


def _fp32_steps(ckpt: str) -> dict:
    from pipeline.backends.megatron_backend.backend import MegatronBackend

    backend = MegatronBackend.from_config(make_cfg(1, 1), ckpt, lr=LR, total_steps=10, reference=True)
    return steps(backend, make_batch())


def _bf16_timing(ckpt: str, n: int = 3) -> dict:
    from lampo.record import TokenBatch
    from pipeline.backends.megatron_backend.backend import MegatronBackend

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151936, (128,), generator=g).tolist() for _ in range(16)]
    responses = [torch.randint(0, 151936, (384,), generator=g).tolist() for _ in range(16)]
    batch = TokenBatch.from_sequences(prompts, responses, pad_id=0)
    batch.old_logprobs = torch.zeros_like(batch.response_mask)
    batch.advantages = torch.randn(16, generator=g)
    cfg = make_cfg(1, 1, bf16=True)
    cfg.backend.micro_batch_size = 4
    backend = MegatronBackend.from_config(cfg, ckpt, lr=1e-6, total_steps=10)
    backend.rl_step(batch)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        m = backend.rl_step(batch)
    torch.cuda.synchronize()
    return {"seconds_per_rl_step": (time.perf_counter() - t) / n, "loss": m["loss"],
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def test_fp32_on_gpu_matches_torch_backend(tmp_path):
    from pipeline.backends.torch_backend import TorchBackend

    ckpt = make_checkpoint(tmp_path / "hf", "qwen2", tied=True)
    got = run_distributed(_fp32_steps, 1, str(ckpt))[0]
    torch_backend = TorchBackend.from_config(make_cfg(name="torch"), ckpt, lr=LR, total_steps=10, reference=True)
    want = steps(torch_backend, make_batch())
    torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=0, atol=1e-4)
    for kind in ("sft", "rl"):
        assert got[kind]["loss"] == pytest.approx(want[kind]["loss"], rel=1e-4)
        assert_weights_close(got[f"w_{kind}"], {k: v for k, v in want[f"w_{kind}"].items() if k != "lm_head.weight"},
                             atol=1e-4)


def test_bf16_rl_step_time_on_a_real_shape(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_05B), dtype=torch.float32).save_pretrained(tmp_path)
    out = run_distributed(_bf16_timing, 1, str(tmp_path))[0]
    print(f"\nQwen2.5-0.5B shape, bf16, 16 x 512 tokens, micro-batch 4, {torch.cuda.get_device_name()}: {out}")
    assert math.isfinite(out["loss"]) and out["seconds_per_rl_step"] > 0
