"""HF <-> Megatron weight conversion: bit-exact round trips for every family and layout (no processes needed)."""
from __future__ import annotations

import pytest
import torch

from pipeline.backends.megatron_backend.convert import hf_to_megatron, megatron_to_hf
from pipeline.backends.megatron_backend.model import arch_from_hf
from tests.megatron_backend.harness import FAMILIES, hf_config


def _random_state(config) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
def test_round_trip_is_bit_exact(family, tied, tp, pp):
    config = hf_config(family, tied=tied, layers=4)
    config.num_attention_heads, config.num_key_value_heads = 8, 4  # 4 kv heads so that tp=4 divides
    if family == "qwen3":
        config.head_dim = 8
    arch = arch_from_hf(config)
    hf = _random_state(config)
    shards = {(t, p): hf_to_megatron(hf, arch, tp, pp, t, p) for t in range(tp) for p in range(pp)}
    back = megatron_to_hf(shards, arch, tp, pp)
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_qkv_rows_are_grouped_per_kv_head():
    """Rank 0 of TP=2 holds query group 0 (q heads 0-1, k_0, v_0) as contiguous rows, in that order."""
    config = hf_config("qwen2", tied=True)
    arch = arch_from_hf(config)
    hf = _random_state(config)
    shard = hf_to_megatron(hf, arch, 2, 1, 0, 0)
    qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]  # (4 * 16, 64) = q0, q1, k0, v0
    hd = arch.head_dim
    assert torch.equal(qkv[: 2 * hd], hf["model.layers.0.self_attn.q_proj.weight"][: 2 * hd])
    assert torch.equal(qkv[2 * hd: 3 * hd], hf["model.layers.0.self_attn.k_proj.weight"][:hd])
    assert torch.equal(qkv[3 * hd:], hf["model.layers.0.self_attn.v_proj.weight"][:hd])


def test_vocab_is_padded_with_zero_rows_and_split():
    config = hf_config("qwen2", tied=False)  # vocab 99
    arch = arch_from_hf(config)
    hf = _random_state(config)
    s0 = hf_to_megatron(hf, arch, 2, 1, 0, 0)["output_layer.weight"]
    s1 = hf_to_megatron(hf, arch, 2, 1, 1, 0)["output_layer.weight"]
    assert s0.shape == s1.shape == (50, 64)
    assert torch.equal(s1[-1], torch.zeros(64))
    assert torch.equal(torch.cat([s0, s1])[:99], hf["lm_head.weight"])


def test_unsupported_family_is_refused():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type"):
        arch_from_hf(GPT2Config())


def test_phi3_sliding_window_and_partial_rotary_are_refused():
    config = hf_config("phi3", tied=False)
    config.sliding_window = 16  # shorter than max_position_embeddings=64
    with pytest.raises(ValueError, match="sliding_window=16"):
        arch_from_hf(config)
    config = hf_config("phi3", tied=False)
    config.rope_parameters["partial_rotary_factor"] = 0.75
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75"):
        arch_from_hf(config)
