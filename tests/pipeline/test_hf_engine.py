"""The HF rollout engine: ordering, seeded reproducibility, log-probs that match a forward pass, EOS handling,
in-memory weight updates, the log-probs option, and sampling from a colocated trainer's own weights (no copy).
Bounded memory with a large vocabulary: ``test_hf_engine_memory.py``."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import TinyModelConfig, load_config
from pipeline.models import load_tokenizer
from pipeline.rollout import SamplingParams, engine_class
from pipeline.stages.rl import make_engine
from pipeline.tiny.model import create_tiny_checkpoint

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", SMALL, seed=0)


@pytest.fixture(scope="module", params=["loop", "generate"])
def engine(ckpt, request):
    """The engine with either decoding mode (``rollout.hf_decode``; ``test_hf_engine_decode.py`` compares them)."""
    path = ckpt
    cfg = load_config(None, ["rollout.batch_size=5", f"rollout.hf_decode={request.param}"])  # batches are cut
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


def test_logprobs_option_changes_nothing_sampled(engine):
    eng, tok = engine
    on = eng.generate(prompts(tok), SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5))
    off = eng.generate(prompts(tok), SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5, logprobs=False))
    assert [g.token_ids for g in off] == [g.token_ids for g in on]
    assert [g.finished for g in off] == [g.finished for g in on]
    assert all(g.logprobs is None for g in off) and all(len(g.logprobs) == len(g.token_ids) for g in on)


@pytest.mark.parametrize("decode", ["loop", "generate"])
def test_sampling_from_the_trainers_model_equals_a_synced_copy(ckpt, monkeypatch, decode):
    """With the torch backend the RL stage passes the trainer's model (``make_engine``): the engine samples
    from those very tensors (nothing loaded, nothing copied), exactly as a copy synced through ``update_weights``
    would, leaves the model in train mode, and weight sync copies nothing."""
    from pipeline.backends import backend_class
    from pipeline.rollout import hf_engine

    cfg = load_config(None, ["rollout.batch_size=5", f"rollout.hf_decode={decode}"])
    tok = load_tokenizer(ckpt, cfg)
    backend = backend_class("torch").from_config(cfg, ckpt, lr=1e-3, total_steps=1)
    with torch.no_grad():  # "training" moved the weights away from the checkpoint
        gen = torch.Generator().manual_seed(0)
        for p in backend.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    copy = engine_class("hf")(ckpt, tok, cfg)
    copy.update_weights(backend.named_full_tensors())

    def no_load(*_, **__):
        raise AssertionError("the shared engine loaded a second copy of the model")

    monkeypatch.setattr(hf_engine, "load_hf_model", no_load)
    shared = make_engine(cfg, ckpt, tok, backend)
    assert shared.model is backend.model and shared.decode == copy.decode == decode
    trainer_ptrs = {n: t.data_ptr() for n, t in backend.model.state_dict().items()}
    assert {n: t.data_ptr() for n, t in shared.model.state_dict().items()} == trainer_ptrs  # the same storage
    assert backend.model.training
    for p in (SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7),
              SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=10, seed=1),
              SamplingParams(n=1, temperature=0.0, max_new_tokens=8)):
        a, b = shared.generate(prompts(tok), p), copy.generate(prompts(tok), p)
        assert [(g.token_ids, g.finished) for g in a] == [(g.token_ids, g.finished) for g in b]
        # the same weights at other addresses: CPU kernels may round the last bit differently
        torch.testing.assert_close([g.logprobs for g in a], [g.logprobs for g in b], atol=1e-6, rtol=1e-6)
        assert backend.model.training  # train mode restored after sampling
    before = {n: t.clone() for n, t in backend.model.state_dict().items()}
    shared.update_weights(backend.named_full_tensors())  # the RL stage's sync: a no-op here
    assert all(torch.equal(before[n], t) for n, t in backend.model.state_dict().items())
    with pytest.raises(RuntimeError, match="shares the trainer's weights"):
        shared.update_weights([(n, torch.zeros_like(t)) for n, t in before.items()])
    assert all(torch.equal(before[n], t) for n, t in backend.model.state_dict().items())
    assert not engine_class("sglang").can_share(backend.model)  # an engine in other processes keeps its own copy


def test_min_new_tokens_suppresses_eos(engine):
    eng, tok = engine
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, min_new_tokens=12, seed=2)
    gens = eng.generate(prompts(tok), p)
    assert all(len(g.token_ids) == 12 and not g.finished and tok.eos_token_id not in g.token_ids for g in gens)
