"""The HF engine's own decode loop (``rollout.hf_decode: loop``, :mod:`pipeline.rollout.hf_decode`) against
transformers' ``generate`` (``hf_decode: generate``): the distribution it samples from is the one HF's logits processors
produce, its random draw is ``torch.multinomial``'s, and so the engine returns the same tokens, finished flags and
log-probs either way, for greedy and sampled settings, prompts of different lengths, rows that end early, and calls
split at the engine's granule. The engine-level tests of ``test_hf_engine.py`` run with both modes."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, TinyModelConfig, load_config
from pipeline.models import load_tokenizer
from pipeline.rollout import SamplingParams, engine_class, hf_decode
from pipeline.rollout.groups import RolloutGroups, shard_params
from pipeline.tiny.model import create_tiny_checkpoint

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)

SETTINGS = [
    SamplingParams(n=3, temperature=1.0, max_new_tokens=14, seed=7),
    SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=12, seed=11),
    SamplingParams(n=2, temperature=1.3, top_k=5, max_new_tokens=10, seed=3),
    SamplingParams(n=2, temperature=0.5, top_p=0.6, max_new_tokens=10, seed=4),
    SamplingParams(n=3, temperature=1.0, max_new_tokens=12, min_new_tokens=6, seed=9),
    SamplingParams(n=2, temperature=0.0, max_new_tokens=12),
    SamplingParams(n=2, temperature=0.0, max_new_tokens=10, min_new_tokens=10),
    SamplingParams(n=1, temperature=1.0, max_new_tokens=1, seed=1),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", SMALL, seed=0)


@pytest.fixture(scope="module")
def engines(ckpt):
    cfg = load_config(None, ["rollout.batch_size=8"])  # several generation batches per call
    tok = load_tokenizer(ckpt, cfg)
    return {m: engine_class("hf")(ckpt, tok, cfg, decode=m) for m in ("loop", "generate")}, tok


def prompts(tok):  # different lengths: left padding inside a batch
    return [tok(t)["input_ids"] for t in ("What is 1+2?", "What is 19-3+4*2?", "7*8?", "What is 9-3+4?", "1+1")]


def _processors_generate_builds(model, params: SamplingParams, prompt_len: int):
    """The LogitsProcessorList ``model.generate`` builds for ``params`` (as the engine's generate path calls it)."""
    import transformers.generation.utils as gen_utils

    seen = []
    orig = gen_utils.GenerationMixin._sample

    def spy(self, input_ids, logits_processor, *args, **kwargs):
        seen.append(logits_processor)
        return orig(self, input_ids, logits_processor, *args, **kwargs)

    kwargs = dict(do_sample=params.temperature > 0, max_new_tokens=params.max_new_tokens, pad_token_id=0,
                  eos_token_id=1)
    if params.min_new_tokens:
        kwargs["min_new_tokens"] = params.min_new_tokens
    if params.temperature > 0:
        kwargs.update(temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k if params.top_k > 0 else None)
    gen_utils.GenerationMixin._sample = spy
    try:
        model.generate(input_ids=torch.ones((1, prompt_len), dtype=torch.long), **kwargs)
    finally:
        gen_utils.GenerationMixin._sample = orig
    return seen[0]


@pytest.mark.parametrize("params", [p for p in SETTINGS if p.max_new_tokens > 1], ids=str)
def test_processed_distribution_is_hfs(engines, params):
    """At every step the loop samples from (greedy: takes the argmax of) exactly the probabilities HF's processors
    give for the same logits, EOS suppression before ``min_new_tokens`` included."""
    eng = engines[0]["loop"]
    torch.manual_seed(0)
    logits = 3 * torch.randn(6, eng.model.config.vocab_size)
    logits[:, 1] += 4  # EOS (id 1 in these processors) often the favourite: its suppression matters
    width = 9
    procs = _processors_generate_builds(eng.model, params, width)
    for step in (0, params.min_new_tokens - 1, params.min_new_tokens, params.max_new_tokens - 1):
        if step < 0:
            continue
        ours = hf_decode.processed_scores(logits, params, step, eos_id=1)
        theirs = procs(torch.ones((6, width + step), dtype=torch.long), logits.clone())
        assert torch.equal(torch.softmax(ours, -1), torch.softmax(theirs, -1)), (params, step)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
        if params.temperature > 0 and (params.top_k > 0 or params.top_p < 1):
            assert torch.isinf(ours).any()  # something was cut: the warpers ran
        if step < params.min_new_tokens:
            assert (ours[:, 1] == -float("inf")).all()
        elif params.temperature == 0 or (params.top_k <= 0 and params.top_p == 1):
            assert torch.isfinite(ours[:, 1]).all()


@pytest.mark.parametrize("rows", [None, [0, 2, 3, 6]])
def test_the_draw_is_torch_multinomials(rows):
    """``choose`` consumes the random stream as ``torch.multinomial(probs, 1)`` on the whole batch does and picks the
    same tokens, also when only some of the batch's rows are still decoding (their rows of that draw)."""
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(8, 300, generator=gen) * 2
    scores[:, ::3] = -float("inf")  # filtered tokens: probability 0, never drawn
    for seed in range(5):
        torch.manual_seed(seed)
        ref = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
        after_ref = torch.rand(3)
        torch.manual_seed(seed)
        idx = None if rows is None else torch.tensor(rows)
        ours = hf_decode.choose(scores if idx is None else scores[idx], params, 8, idx)
        assert torch.equal(ours, ref if idx is None else ref[idx])
        assert torch.equal(torch.rand(3), after_ref)  # the same amount of the stream consumed
        assert (ours % 3 != 0).all()


@pytest.mark.parametrize("params", SETTINGS, ids=str)
def test_loop_returns_what_generate_returns(engines, params):
    (eng, tok), ps = engines, prompts(engines[1])
    a, b = eng["loop"].generate(ps, params), eng["generate"].generate(ps, params)
    assert [(g.prompt_index, g.token_ids, g.finished) for g in a] == [(g.prompt_index, g.token_ids, g.finished)
                                                                       for g in b]
    torch.testing.assert_close([torch.tensor(g.logprobs) for g in a], [torch.tensor(g.logprobs) for g in b],
                               atol=1e-5, rtol=1e-5)
    for g in a:
        assert len(g.logprobs) == len(g.token_ids) >= max(1, params.min_new_tokens)
        assert g.finished == (g.token_ids[-1] == tok.eos_token_id) and tok.eos_token_id not in g.token_ids[:-1]


def test_rows_dropped_at_eos_leave_the_rest_unchanged(engines, monkeypatch):
    """Finished rows leave the batch (here as soon as one has ended): the other rows sample what they would have."""
    eng, tok = engines
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=24, seed=5)
    ps = prompts(tok)
    keep_all = eng["loop"].generate(ps, params)
    calls = []
    monkeypatch.setattr(hf_decode, "COMPACT_FRACTION", 1e-9)
    orig = hf_decode.DynamicCache.batch_select_indices
    monkeypatch.setattr(hf_decode.DynamicCache, "batch_select_indices",
                        lambda self, idx: (calls.append(len(idx)), orig(self, idx))[1])
    dropped = eng["loop"].generate(ps, params)
    assert calls, "no row was dropped: the test needs rows that end before others"
    assert [(g.token_ids, g.finished) for g in dropped] == [(g.token_ids, g.finished) for g in keep_all]
    lengths = {len(g.token_ids) for g in keep_all}
    assert len(lengths) > 1 and any(g.finished for g in keep_all)


@pytest.mark.parametrize("mode", ["loop", "generate"])
def test_a_call_split_at_the_granule_samples_what_one_call_samples(engines, mode):
    eng, tok = engines[0][mode], engines[1]
    ps = prompts(tok) * 2
    params = SamplingParams(n=4, temperature=0.8, top_p=0.95, max_new_tokens=10, seed=21)
    whole = eng.generate(ps, params)
    parts = []
    for shard in RolloutGroups(world_size=3, rank=0, size=1).shards(len(ps), eng.shard_granule(params.n)):
        for g in eng.generate(ps[shard.start:shard.stop], shard_params(params, shard)):
            g.prompt_index += shard.start
            parts.append(g)
    assert [(g.prompt_index, g.token_ids, g.logprobs) for g in parts] == [(g.prompt_index, g.token_ids, g.logprobs)
                                                                           for g in whole]


def test_mode_is_validated(ckpt):
    cfg = load_config(None, ["rollout.hf_decode=generate"])
    assert cfg.rollout.hf_decode == "generate" and load_config(None).rollout.hf_decode == "loop"
    with pytest.raises(ConfigError, match="rollout.hf_decode='fast' is not one of 'loop', 'generate'"):
        load_config(None, ["rollout.hf_decode=fast"])
    tok = load_tokenizer(ckpt, cfg)
    assert engine_class("hf")(ckpt, tok, cfg).decode == "generate"
    with pytest.raises(ValueError, match="'loop' or 'generate'"):
        engine_class("hf")(ckpt, tok, cfg, decode="static")
