"""Rollout groups: the split of a call's prompts across engines, and the seeds that make the split invisible."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import TinyModelConfig, load_config
from pipeline.models import load_tokenizer
from pipeline.rollout import SamplingParams, engine_class
from pipeline.rollout.groups import RolloutGroups, shard_params
from pipeline.tiny.model import create_tiny_checkpoint


@given(engines=st.integers(1, 8), size=st.integers(1, 4), n=st.integers(0, 200), granule=st.integers(1, 40))
def test_shards_are_contiguous_balanced_and_cut_at_granules(engines, size, n, granule):
    g = RolloutGroups(world_size=engines * size, rank=0, size=size)
    shards = g.shards(n, granule)
    assert len(shards) == engines
    assert [i for s in shards for i in s] == list(range(n))  # contiguous, in order, every prompt once
    for s in shards:
        assert s.start % granule == 0 or len(s) == 0
    units = [-(-len(s) // granule) for s in shards]
    assert max(units) - min(units) <= 1  # balanced in whole granules


def test_leaders_and_engine_index():
    groups = [RolloutGroups(8, r, 4) for r in range(8)]
    assert [g.engine_index for g in groups] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [g.is_leader for g in groups] == [True, False, False, False, True, False, False, False]
    assert groups[0].leaders() == [0, 4]
    with pytest.raises(ValueError, match="rollout.tensor_parallel=3 must divide the world size 1"):
        RolloutGroups.current(3)


def test_shard_params_offsets_the_seed_by_the_shards_first_request():
    p = SamplingParams(n=4, seed=100)
    assert shard_params(p, range(3, 6)).seed == 112
    assert shard_params(SamplingParams(n=4), range(3, 6)).seed is None


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m",
                                  TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                                  intermediate_size=64), seed=0)
    cfg = load_config(None, ["rollout.batch_size=6"])  # 2 prompts x 3 samples per generation batch
    tok = load_tokenizer(path, cfg)
    return engine_class("hf")(path, tok, cfg), tok


@pytest.mark.parametrize("engines", [2, 3])
def test_hf_engine_split_across_engines_samples_what_one_engine_samples(hf, engines):
    eng, tok = hf
    prompts = [tok(f"What is {a}+{b}?")["input_ids"] for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2)]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=11)
    whole = eng.generate(prompts, params)
    groups = RolloutGroups(world_size=engines, rank=0, size=1)
    parts = []
    for shard in groups.shards(len(prompts), eng.shard_granule(params.n)):
        for g in eng.generate(prompts[shard.start:shard.stop], shard_params(params, shard)):
            g.prompt_index += shard.start
            parts.append(g)
    assert [(g.prompt_index, g.token_ids) for g in parts] == [(g.prompt_index, g.token_ids) for g in whole]
    torch.testing.assert_close([torch.tensor(g.logprobs) for g in parts], [torch.tensor(g.logprobs) for g in whole])
    assert len({tuple(g.token_ids) for g in whole}) > 1  # sampled, not all alike
