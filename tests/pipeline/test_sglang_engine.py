"""The SGLang rollout engine, on CPU: SGLang itself is GPU-only and not installed here, so these tests cover the clear
install error, the conversion of SGLang's output records into :class:`Generation`, the requests the engine builds,
weight-sync bucketing (with a fake in-process engine), and the HTTP path against a small local stand-in server that
speaks SGLang's JSON. The real ``sglang.Engine`` path runs only on a GPU machine and is not exercised here.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pipeline.config import Config
from pipeline.rollout import engine_class
from pipeline.rollout.base import SamplingParams
from pipeline.rollout.sglang_engine import SGLangEngine, to_generation

EOS = 2
TOKENIZER = SimpleNamespace(eos_token_id=EOS)


def sglang_output(ids: list[int], reason: dict[str, Any], logprobs: list[float] | None = None) -> dict[str, Any]:
    """A result record as ``sglang.Engine.generate`` returns it (skip_tokenizer_init: no text)."""
    meta: dict[str, Any] = {"id": "r", "finish_reason": reason, "prompt_tokens": 3, "completion_tokens": len(ids)}
    if logprobs is not None:
        meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(logprobs, ids)]
    return {"text": "", "output_ids": ids, "meta_info": meta}


class FakeEngine:
    """Records calls; answers ``generate`` with prompt-dependent tokens: request k gets ``[prompt[-1] + k, ...]``."""

    def __init__(self, update_result: Any = (True, "ok")):
        self.calls: list[tuple[str, Any]] = []
        self.update_result = update_result

    def generate(self, *, input_ids, sampling_params, return_logprob):
        self.calls.append(("generate", dict(input_ids=input_ids, sampling_params=sampling_params,
                                            return_logprob=return_logprob)))
        outs = []
        for k, (p, sp) in enumerate(zip(input_ids, sampling_params)):
            ids = [10 + p[-1], 20 + k] + ([EOS] if k % 2 == 0 else [30])
            reason = {"type": "stop", "matched": EOS} if ids[-1] == EOS else {"type": "length", "length": 3}
            outs.append(sglang_output(ids, reason, [-0.5 * (j + 1) for j in range(len(ids))]))
        return outs

    def update_weights_from_tensor(self, *, named_tensors, flush_cache):
        self.calls.append(("update", ([n for n, _ in named_tensors], flush_cache)))
        return self.update_result

    def flush_cache(self):
        self.calls.append(("flush", None))

    def release_memory_occupation(self):
        self.calls.append(("release", None))

    def resume_memory_occupation(self):
        self.calls.append(("resume", None))


def test_registered_and_importable_without_sglang():
    assert engine_class("sglang") is SGLangEngine


def test_missing_sglang_raises_a_clear_install_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` fail even where it is installed
    hint = r"optional GPU-only dependency.*pip install 'sglang\[all\]'.*rollout\.engine=hf"
    with pytest.raises(ImportError, match=hint):
        SGLangEngine(tmp_path, TOKENIZER, Config())


# --- output conversion ----------------------------------------------------------------------------------------------
def test_to_generation_stop_on_eos_keeps_the_eos_token_and_its_logprob():
    g = to_generation(sglang_output([5, 6, EOS], {"type": "stop", "matched": EOS}, [-1.0, -2.0, -0.25]), 4, EOS)
    assert (g.prompt_index, g.token_ids, g.logprobs, g.finished) == (4, [5, 6, EOS], [-1.0, -2.0, -0.25], True)


def test_to_generation_length_cut_is_unfinished_unless_the_last_token_is_eos():
    cut = to_generation(sglang_output([5, 6], {"type": "length", "length": 2}, [-1.0, -2.0]), 0, EOS)
    assert cut.finished is False and cut.token_ids == [5, 6]
    # SGLang checks the length limit first: EOS sampled as the very last allowed token is reported as "length"
    eos_last = to_generation(sglang_output([5, EOS], {"type": "length", "length": 2}, [-1.0, -2.0]), 0, EOS)
    assert eos_last.finished is True


def test_to_generation_accepts_http_json_lists_and_missing_logprobs():
    rec = json.loads(json.dumps(sglang_output([7, EOS], {"type": "stop", "matched": EOS}, [-0.1, -0.2])))
    assert to_generation(rec, 1, EOS).logprobs == [-0.1, -0.2]  # tuples became lists
    assert to_generation(sglang_output([7], {"type": "length", "length": 1}), 1, EOS).logprobs is None


def test_to_generation_refuses_aborts_and_misaligned_logprobs():
    with pytest.raises(RuntimeError, match="aborted.*out of memory"):
        to_generation(sglang_output([], {"type": "abort", "message": "out of memory"}), 0, EOS)
    bad = sglang_output([5, 6], {"type": "length", "length": 2}, [-1.0, -2.0])
    bad["meta_info"]["output_token_logprobs"] = bad["meta_info"]["output_token_logprobs"][:1]
    with pytest.raises(RuntimeError, match="log-probs for tokens"):
        to_generation(bad, 0, EOS)


# --- the engine with a fake in-process SGLang -----------------------------------------------------------------------
def test_generate_expands_samples_prompt_major_and_builds_sampling_params():
    fake = FakeEngine()
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    prompts = [[1, 3], [4], [5, 6, 7]]
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=3, seed=100)
    gens = eng.generate(prompts, params)
    (_, call), = fake.calls
    assert call["input_ids"] == [[1, 3], [1, 3], [4], [4], [5, 6, 7], [5, 6, 7]] and call["return_logprob"]
    sp = call["sampling_params"]
    assert [p["sampling_seed"] for p in sp] == list(range(100, 106))  # one seed per sample, all distinct
    assert all(p["stop_token_ids"] == [EOS] and p["max_new_tokens"] == 3 and p["temperature"] == 0.7
               and p["top_p"] == 0.9 and p["top_k"] == 5 for p in sp)
    assert [g.prompt_index for g in gens] == [0, 0, 1, 1, 2, 2]
    assert [g.token_ids[0] for g in gens] == [13, 13, 14, 14, 17, 17]  # each result went to its own prompt
    assert [g.finished for g in gens] == [True, False] * 3
    assert all(len(g.logprobs) == len(g.token_ids) for g in gens)
    eng.generate(prompts, SamplingParams(n=1))
    assert all("sampling_seed" not in p for p in fake.calls[-1][1]["sampling_params"])  # no seed: none sent


def test_update_weights_streams_buckets_then_flushes_the_cache(monkeypatch):
    import pipeline.rollout.sglang_engine as mod

    monkeypatch.setattr(mod, "BUCKET_BYTES", 3 * 4 * 4)  # three 4-float tensors per bucket
    fake = FakeEngine()
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    names = [f"w{i}" for i in range(7)]
    eng.update_weights((n, torch.zeros(4)) for n in names)
    updates = [c[1] for c in fake.calls if c[0] == "update"]
    assert [u[0] for u in updates] == [names[:3], names[3:6], names[6:]]
    assert all(flush is False for _, flush in updates) and fake.calls[-1] == ("flush", None)


def test_update_weights_failure_is_raised():
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=FakeEngine(update_result=(False, "shape mismatch")))
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: shape mismatch"):
        eng.update_weights([("w", torch.zeros(2))])


def test_release_and_reacquire_memory_call_sglang():
    fake = FakeEngine()
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    eng.release_memory()
    eng.reacquire_memory()
    assert [c[0] for c in fake.calls] == ["release", "resume"]


# --- the HTTP path against a local stand-in server --------------------------------------------------------------------
class StandIn(BaseHTTPRequestHandler):
    """Answers like ``sglang.launch_server`` for the routes the engine uses; records what it was sent."""

    seen: list[tuple[str, Any]] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        StandIn.seen.append((self.path, body))
        if self.path == "/generate":
            reply: Any = [sglang_output([p[-1], EOS], {"type": "stop", "matched": EOS}, [-0.3, -0.4])
                          for p in body["input_ids"]]
        elif self.path == "/update_weights_from_disk":
            from safetensors.torch import load_file

            folder = Path(body["model_path"])
            ok = (folder / "config.json").is_file()
            StandIn.seen.append(("loaded", {k: v.tolist() for k, v in load_file(folder / "model.safetensors").items()}))
            reply = {"success": ok, "message": "" if ok else "no config.json"}
        else:
            reply = None
        data = json.dumps(reply).encode() if reply is not None else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    StandIn.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_http_generate_and_weight_sync_through_disk(server, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = Config()
    cfg.rollout.sglang_url = server + "/"
    eng = SGLangEngine(tmp_path, TOKENIZER, cfg)
    gens = eng.generate([[5, 9], [8]], SamplingParams(n=2, max_new_tokens=4))
    assert [(g.prompt_index, g.token_ids, g.logprobs, g.finished) for g in gens] == \
        [(0, [9, EOS], [-0.3, -0.4], True)] * 2 + [(1, [8, EOS], [-0.3, -0.4], True)] * 2
    eng.update_weights([("a", torch.tensor([1.0, 2.0])), ("b", torch.tensor([[3.0]]))])
    routes = [path for path, _ in StandIn.seen]
    assert routes == ["/generate", "/update_weights_from_disk", "loaded"]
    assert StandIn.seen[2][1] == {"a": [1.0, 2.0], "b": [[3.0]]}
    assert not Path(StandIn.seen[1][1]["model_path"]).exists()  # the temporary folder is removed afterwards
    eng.shutdown()  # a server we did not start is left running


def test_http_unreachable_server_says_so():
    cfg = Config()
    cfg.rollout.sglang_url = "http://127.0.0.1:9"  # discard port: nothing listens
    eng = SGLangEngine("unused", TOKENIZER, cfg)
    with pytest.raises(RuntimeError, match="cannot reach the SGLang server"):
        eng.generate([[1]], SamplingParams())
