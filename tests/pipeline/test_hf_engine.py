"""The HF rollout engine: ordering, seeded reproducibility, log-probs that match a forward pass, EOS handling and
in-memory weight updates."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import TinyModelConfig, load_config
from pipeline.models import load_tokenizer
from pipeline.rollout import SamplingParams, engine_class
from pipeline.tiny.model import create_tiny_checkpoint

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", SMALL, seed=0)
    cfg = load_config(None, ["rollout.batch_size=5"])  # smaller than the job count: batches are cut
    tok = load_tokenizer(path, cfg)
    return engine_class("hf")(path, tok, cfg), tok


def prompts(tok):
    return [tok("What is 1+2?")["input_ids"], tok("What is 9-3+4?")["input_ids"]]


def test_order_count_and_reproducibility(engine):
    eng, tok = engine
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
    a, b = eng.generate(prompts(tok), p), eng.generate(prompts(tok), p)
    assert [g.prompt_index for g in a] == [0, 0, 0, 1, 1, 1]
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    c = eng.generate(prompts(tok), SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=8))
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    for g in a:
        assert 1 <= len(g.token_ids) <= 12 and len(g.logprobs) == len(g.token_ids)
        assert g.finished == (g.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in g.token_ids[:-1]


def test_logprobs_match_a_forward_pass(engine):
    eng, tok = engine
    g = eng.generate(prompts(tok)[1:], SamplingParams(n=1, temperature=1.0, max_new_tokens=10, seed=3))[0]
    ids = torch.tensor([prompts(tok)[1] + g.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(eng.model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(g.logprobs), lp[-len(g.token_ids):], atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_without_seed(engine):
    eng, tok = engine
    p = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    a = eng.generate(prompts(tok), p)
    assert a[0].token_ids == a[1].token_ids  # greedy: both samples of a prompt agree


def test_update_weights_in_memory(engine):
    eng, tok = engine
    p = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    before = [g.token_ids for g in eng.generate(prompts(tok), p)]
    saved = {k: v.clone() for k, v in eng.model.state_dict().items()}
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in saved.items()}
    eng.update_weights(new.items())
    assert [g.token_ids for g in eng.generate(prompts(tok), p)] != before
    eng.update_weights(saved.items())
    assert [g.token_ids for g in eng.generate(prompts(tok), p)] == before
    with pytest.raises(KeyError, match="not a parameter"):
        eng.update_weights([("no.such.weight", torch.zeros(1))])
