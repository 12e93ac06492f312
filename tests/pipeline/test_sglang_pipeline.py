"""The RL stage with ``rollout.engine=sglang`` and ``rollout.colocate=true``, in process, against the stateful
fake of ``sglang`` 0.5.21 in ``fake_sglang.py`` (real tokens and log-probs from the tiny model on CPU; the release's
rules on memory release/resume and the weight-update session enforced). Catches what only shows in the real loop:
resuming memory on an engine that was never released (iteration 0), tensor updates outside a session, generating
from weights that did not survive a release, and output records the stage cannot read."""
from __future__ import annotations

import json
import sys

import pytest

from pipeline.runner import run
from tests.pipeline import fake_sglang
from tests.pipeline.test_runner import SMALL

FAST = [o for o in SMALL if not o.startswith(("sft.", "eval.", "rl.iterations="))] + [
    "run.stages=[rl]", "rl.iterations=3", "rl.eval_every=0", "rollout.engine=sglang", "rollout.colocate=true",
    "rollout.max_new_tokens=12"]


@pytest.fixture
def sglang(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", fake_sglang)
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB", raising=False)
    fake_sglang.Engine.instances = []
    return fake_sglang


def test_rl_stage_runs_colocated_against_the_sglang_fake(sglang, tmp_path):
    run("configs/tiny.yaml", [f"run.dir={tmp_path / 'run'}", *FAST])
    (eng,) = sglang.Engine.instances
    assert eng.dead == "shut down"  # never crashed; shut down at the end of the stage
    calls = [m for m, _ in eng.log]
    # the engine started live: iteration 0 syncs without a resume, every later one resumes first
    assert calls[1:4] == ["begin_weight_update", "update_weights_from_tensor", "end_weight_update"]
    assert calls.count("release_memory_occupation") == 3 and calls.count("resume_memory_occupation") == 2
    assert calls.count("begin_weight_update") == calls.count("end_weight_update") == 3
    assert calls.count("generate") == 3
    init = eng.log[0][1]
    assert init["enable_memory_saver"] is True and init["skip_tokenizer_init"] is True
    assert init["enable_deterministic_inference"] is False
    rows = [json.loads(x) for x in (tmp_path / "run" / "rl" / "rollouts" / "iter_00003.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["response_ids"] for r in rows)
    assert json.loads((tmp_path / "run" / "state" / "rl.json").read_text())["status"] == "done"


def test_whole_tiny_pipeline_runs_colocated_against_the_sglang_fake(sglang, tmp_path):
    """SFT -> RL (with an evaluation during training on the live engine) -> evaluate (an engine per checkpoint)."""
    run("configs/tiny.yaml", [f"run.dir={tmp_path / 'run'}", *SMALL, "rollout.engine=sglang",
                              "rollout.colocate=true", "rl.eval_every=2", "eval.limit=4"])
    engines = sglang.Engine.instances
    assert len(engines) == 3  # the RL stage's, then one per checkpoint (sft, rl) in the evaluate stage
    assert all(e.dead == "shut down" for e in engines)
    assert any(m == "generate" and kw["sampling_params"][0]["temperature"] == 0.0 for m, kw in engines[0].log)
    summary = (tmp_path / "run" / "eval" / "summary.md").read_text()
    assert "| tiny | avg@1 |" in summary and "sft" in summary and "rl" in summary
    assert (tmp_path / "run" / "eval" / "rl_iter_00002" / "results.json").exists()


# --- the engine alone against the fake, on the tiny model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.models import load_tokenizer
    from pipeline.tiny.model import create_tiny_checkpoint

    small = ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128"]
    cfg = load_config(None, small)
    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base", cfg.model.tiny, seed=0)
    return path, load_tokenizer(path, cfg)


def engine(path, tok, *overrides):
    from pipeline.config import load_config
    from pipeline.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(path, tok, load_config(None, ["rollout.colocate=false", *overrides]))


def test_logprobs_are_before_temperature(sglang, tiny):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.rollout.base import SamplingParams

    path, tok = tiny
    prompt = tok("12+7=")["input_ids"]
    eng = engine(path, tok)
    gens = eng.generate([prompt], SamplingParams(n=2, temperature=0.7, max_new_tokens=6, seed=3))
    eng.shutdown()
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    for g in gens:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + g.token_ids])).logits[0, len(prompt) - 1:-1]
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-5)


def test_sampling_seeds_repeat_samples_only_in_deterministic_mode(sglang, tiny):
    """A resumed run starts a fresh engine and asks for iteration k's samples without iterations 0..k-1 before them:
    with rollout.sglang_deterministic the per-request seeds make those samples the same, without it they differ."""
    from pipeline.rollout.base import SamplingParams

    path, tok = tiny
    prompts = [tok("3*4=")["input_ids"]]
    first, second = (SamplingParams(n=4, temperature=1.0, max_new_tokens=8, seed=s) for s in (100, 200))

    def uninterrupted_and_resumed(*overrides):
        a = engine(path, tok, *overrides)
        a.generate(prompts, first)
        b = engine(path, tok, *overrides)
        return [[g.token_ids for g in e.generate(prompts, second)] for e in (a, b)]

    straight, resumed = uninterrupted_and_resumed("rollout.sglang_deterministic=true")
    assert straight == resumed
    straight, resumed = uninterrupted_and_resumed()
    assert straight != resumed


def test_the_fake_enforces_the_release_rules(sglang, tiny):
    """The rules the tests above rely on (fake_sglang.py cites where each comes from in the release)."""
    import torch

    path, _ = tiny
    e = sglang.Engine(model_path=str(path), skip_tokenizer_init=True, enable_memory_saver=True)
    ok, msg = e.update_weights_from_tensor([("model.norm.weight", torch.ones(64))], flush_cache=False)
    assert not ok and "begin_weight_update" in msg  # no session
    assert e.end_weight_update()[0] is False and e.begin_weight_update()[0] is True
    assert e.begin_weight_update()[0] is False and e.end_weight_update()[0] is True
    e.release_memory_occupation()
    with pytest.raises(sglang.SchedulerDied, match="released"):
        e.generate(input_ids=[[1, 2]], sampling_params=[{}])
    with pytest.raises(sglang.SchedulerDied, match="dead"):
        e.resume_memory_occupation()  # a scheduler that raised is gone for good
    fresh = sglang.Engine(model_path=str(path), skip_tokenizer_init=True)
    with pytest.raises(sglang.SchedulerDied, match="KeyError"):
        fresh.resume_memory_occupation()  # never released
    again = sglang.Engine(model_path=str(path), skip_tokenizer_init=True)
    again.release_memory_occupation(tags=["kv_cache", "weights", "cuda_graph"])
    again.resume_memory_occupation(tags=["kv_cache", "weights", "cuda_graph"])
    with pytest.raises(RuntimeError, match="without reloading the weights"):
        again.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 2})
    assert again.update_weights_from_disk(str(path))[0] is True
    out = again.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 2}, return_logprob=True)
    assert set(out) == {"output_ids", "meta_info"} and len(out["meta_info"]["output_token_logprobs"]) == 2
