"""The SGLang rollout engine, on CPU: SGLang itself is GPU-only and not installed here, so these tests cover the clear
install error, the conversion of SGLang's output records into :class:`Generation`, the requests the engine builds,
weight sync (buckets inside one weight-update session) and the memory release/resume state with a recording fake, the
same against the stateful fake of ``tests/pipeline/fake_sglang.py`` (which enforces the pinned release's rules), and the
HTTP path against a small local stand-in server that speaks SGLang's JSON. The real ``sglang.Engine`` path runs only on
a GPU machine and is not exercised here; ``test_sglang_contract.py`` checks the calls against the release's source.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

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

    def begin_weight_update(self):
        self.calls.append(("begin", None))
        return True, "Success"

    def end_weight_update(self):
        self.calls.append(("end", None))
        return True, "Success"

    def generate(self, *, input_ids, sampling_params, return_logprob):
        self.calls.append(("generate", dict(input_ids=input_ids, sampling_params=sampling_params,
                                            return_logprob=return_logprob)))
        outs = []
        for k, (p, _sp) in enumerate(zip(input_ids, sampling_params)):
            ids = [10 + p[-1], 20 + k] + ([EOS] if k % 2 == 0 else [30])
            reason = {"type": "stop", "matched": EOS} if ids[-1] == EOS else {"type": "length", "length": 3}
            outs.append(sglang_output(ids, reason, [-0.5 * (j + 1) for j in range(len(ids))]))
        return outs

    def update_weights_from_tensor(self, *, named_tensors, flush_cache):
        self.calls.append(("update", ([n for n, _ in named_tensors], flush_cache)))
        return self.update_result

    def flush_cache(self):
        self.calls.append(("flush", None))
        return SimpleNamespace(success=True, message="")

    def release_memory_occupation(self, tags):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags):
        self.calls.append(("resume", tags))


def test_registered_and_importable_without_sglang():
    assert engine_class("sglang") is SGLangEngine


def test_missing_sglang_raises_a_clear_install_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` fail even where it is installed
    hint = r"optional GPU-only dependency.*pip install -r requirements-gpu\.txt.*rollout\.engine=hf"
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
               and p["top_p"] == 0.9 and p["top_k"] == 5 and p["min_new_tokens"] == 0 for p in sp)
    assert [g.prompt_index for g in gens] == [0, 0, 1, 1, 2, 2]
    assert [g.token_ids[0] for g in gens] == [13, 13, 14, 14, 17, 17]  # each result went to its own prompt
    assert [g.finished for g in gens] == [True, False] * 3
    assert all(len(g.logprobs) == len(g.token_ids) for g in gens)
    eng.generate(prompts, SamplingParams(n=1))
    assert all("sampling_seed" not in p for p in fake.calls[-1][1]["sampling_params"])  # no seed: none sent
    eng.generate(prompts, SamplingParams(n=1, max_new_tokens=3, min_new_tokens=3, logprobs=False))
    call = fake.calls[-1][1]
    assert not call["return_logprob"]  # the caller needs none (the RL stage recomputes them; evaluation never)
    assert all(p["min_new_tokens"] == 3 for p in call["sampling_params"])


def test_update_weights_streams_buckets_in_one_session_then_flushes_the_cache(monkeypatch):
    import pipeline.rollout.sglang_engine as mod

    monkeypatch.setattr(mod, "BUCKET_BYTES", 3 * 4 * 4)  # three 4-float tensors per bucket
    fake = FakeEngine()
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    names = [f"w{i}" for i in range(7)]
    eng.update_weights((n, torch.zeros(4)) for n in names)
    assert [c[0] for c in fake.calls] == ["begin", "update", "update", "update", "end", "flush"]
    updates = [c[1] for c in fake.calls if c[0] == "update"]
    assert [u[0] for u in updates] == [names[:3], names[3:6], names[6:]]
    assert all(flush is False for _, flush in updates)


def test_update_weights_failure_is_raised_and_the_session_closed():
    fake = FakeEngine(update_result=(False, "shape mismatch"))
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: shape mismatch"):
        eng.update_weights([("w", torch.zeros(2))])
    assert [c[0] for c in fake.calls] == ["begin", "update", "end"]


def test_update_weights_sends_cuda_tensors_when_cuda_is_available(monkeypatch):
    """CPU tensors would travel through /dev/shm; with CUDA each bucket is moved to the current device first."""
    moved: list[torch.device] = []
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        moved.append(args[0])
        return real_to(self, "cpu")  # no GPU here: record the target, stay on CPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    fake = FakeEngine()
    SGLangEngine("unused", TOKENIZER, Config(), engine=fake).update_weights([("a", torch.zeros(2)),
                                                                             ("b", torch.ones(3))])
    assert moved == [torch.device("cuda", 0)] * 2


def test_memory_release_and_resume_follow_the_engine_state():
    """SGLang raises in its scheduler (and the engine dies) on a resume of memory it never released: a new engine is
    live, so reacquire is a no-op until a release; release is idempotent; the weights need a sync after a resume."""
    fake = FakeEngine()
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    eng.reacquire_memory()  # a new engine holds its memory: nothing to resume
    assert fake.calls == []
    eng.release_memory()
    eng.release_memory()  # already released: not twice
    tags = ["kv_cache", "weights", "cuda_graph"]
    assert fake.calls == [("release", tags)]
    with pytest.raises(RuntimeError, match="while its memory is released"):
        eng.generate([[1]], SamplingParams())
    with pytest.raises(RuntimeError, match="while its memory is released"):
        eng.update_weights([("w", torch.zeros(1))])
    eng.reacquire_memory()
    eng.reacquire_memory()
    assert fake.calls == [("release", tags), ("resume", tags)]
    with pytest.raises(RuntimeError, match="weights did not survive"):
        eng.generate([[1]], SamplingParams())
    eng.update_weights([("w", torch.zeros(1))])
    assert len(eng.generate([[1]], SamplingParams())) == 1


def test_no_release_while_generating():
    fake = FakeEngine()
    eng = SGLangEngine("unused", TOKENIZER, Config(), engine=fake)
    real_generate = fake.generate
    seen: list[BaseException] = []

    def generate_and_release(**kw):
        try:
            eng.release_memory()  # e.g. another thread, mid-generation
        except RuntimeError as e:
            seen.append(e)
        return real_generate(**kw)

    fake.generate = generate_and_release
    eng.generate([[1]], SamplingParams())
    assert len(seen) == 1 and "while a generate call is running" in str(seen[0])
    assert not eng.released and all(c[0] != "release" for c in fake.calls)


def test_engine_kwargs_turn_deterministic_inference_on_only_when_asked():
    from pipeline.rollout.sglang_engine import engine_kwargs

    cfg = Config()
    assert engine_kwargs("m", cfg)["enable_deterministic_inference"] is False
    cfg.rollout.sglang_deterministic = True
    kw = engine_kwargs("m", cfg)
    assert kw["enable_deterministic_inference"] is True and kw["skip_tokenizer_init"] is True
    assert kw["enable_memory_saver"] is cfg.rollout.colocate


def test_engine_started_with_the_pinned_keywords(monkeypatch, tmp_path):
    """In-process start: sglang.Engine gets engine_kwargs, and log-probs before temperature are asked for."""
    got: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "sglang", SimpleNamespace(Engine=lambda **kw: got.update(kw) or FakeEngine()))
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB", raising=False)
    cfg = Config()
    cfg.rollout.sglang_deterministic = True
    SGLangEngine(tmp_path, TOKENIZER, cfg)
    assert got["model_path"] == str(tmp_path) and got["enable_deterministic_inference"] is True
    import os

    assert os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"


# --- the HTTP path against a local stand-in server --------------------------------------------------------------------
class StandIn(BaseHTTPRequestHandler):
    """Answers like ``sglang.launch_server`` for the routes the engine uses; records what it was sent."""

    seen: ClassVar[list[tuple[str, Any]]] = []

    def do_POST(self):
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
        elif self.path == "/flush_cache":  # the real route answers plain text, not JSON
            data = b"Cache flushed.\nPlease check backend logs for more details.\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
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
    cfg.rollout.sglang_urls = [server + "/"]
    eng = SGLangEngine(tmp_path, TOKENIZER, cfg)
    gens = eng.generate([[5, 9], [8]], SamplingParams(n=2, max_new_tokens=4))
    assert [(g.prompt_index, g.token_ids, g.logprobs, g.finished) for g in gens] == \
        [(0, [9, EOS], [-0.3, -0.4], True)] * 2 + [(1, [8, EOS], [-0.3, -0.4], True)] * 2
    eng.update_weights([("a", torch.tensor([1.0, 2.0])), ("b", torch.tensor([[3.0]]))])
    routes = [path for path, _ in StandIn.seen]
    assert routes == ["/generate", "/update_weights_from_disk", "loaded"]
    assert StandIn.seen[2][1] == {"a": [1.0, 2.0], "b": [[3.0]]}
    assert not Path(StandIn.seen[1][1]["model_path"]).exists()  # the temporary folder is removed afterwards
    eng.release_memory()
    eng.reacquire_memory()
    assert StandIn.seen[-2:] == [("/release_memory_occupation", {"tags": ["kv_cache", "weights", "cuda_graph"]}),
                                 ("/resume_memory_occupation", {"tags": ["kv_cache", "weights", "cuda_graph"]})]
    assert eng.engine.flush_cache().startswith("Cache flushed")  # plain-text answer, not a JSON error
    eng.shutdown()  # a server we did not start is left running


def test_http_unreachable_server_says_so():
    cfg = Config()
    cfg.rollout.sglang_urls = ["http://127.0.0.1:9"]  # discard port: nothing listens
    eng = SGLangEngine("unused", TOKENIZER, cfg)
    with pytest.raises(RuntimeError, match="cannot reach the SGLang server"):
        eng.generate([[1]], SamplingParams())
