"""SGLang rollout engine (GPU only): continuous-batched sampling with per-token log-probs, in-memory weight sync, and
memory release for colocation with the trainer.

Two ways to reach SGLang, behind the same methods:

* ``rollout.sglang_url`` unset (default): an in-process offline engine, ``sglang.Engine(model_path=...,
  mem_fraction_static=rollout.sglang_mem_fraction, skip_tokenizer_init=True, ...)``. Weights are synced in memory with
  ``Engine.update_weights_from_tensor`` (CUDA tensors travel by IPC handle), in buckets of about 1 GiB;
* ``rollout.sglang_url`` set: an already running ``sglang.launch_server`` reached over HTTP (``/generate``,
  ``/update_weights_from_disk``, ``/release_memory_occupation``, ...). Tensors cannot travel over HTTP, so
  :meth:`SGLangEngine.update_weights` writes them as a checkpoint folder (safetensors + the model's config.json) and
  asks the server to load it: the server must see this machine's file system (same host or a shared disk).

Log-probs: our :class:`Generation` contract is the log-prob of each sampled token under the model *before*
temperature. SGLang reports ``log_softmax(logits / temperature)`` unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set, so
we set it before starting the in-process engine (for a server started elsewhere, start it with that variable set; at
temperature 1 the two agree). All requests of a call are submitted at once and SGLang batches them continuously
(``rollout.batch_size`` is the HF engine's knob and is not used here). Seeds: ``SamplingParams.seed`` becomes each
request's ``sampling_seed`` (seed + request index); SGLang honours it only with ``--enable-deterministic-inference``.

SGLang is an optional dependency, imported only here, and cannot be installed on the CPU machines this project is
tested on: the conversion of SGLang's output records and the request building are unit-tested with fake engines; the
real GPU path is not exercised by the test suite.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from pipeline.rollout.base import Generation, RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from pipeline.config import Config

INSTALL_HINT = ("rollout.engine=sglang needs SGLang, an optional GPU-only dependency that is not installed. On a CUDA "
                "machine: pip install 'sglang[all]' (see https://docs.sglang.ai/get_started/install.html); on CPU use "
                "rollout.engine=hf")
BUCKET_BYTES = 1 << 30  # weight-sync bucket size for update_weights_from_tensor


def import_sglang() -> Any:
    """The ``sglang`` module, or an ImportError that says it is optional and how to install it."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return sglang


def to_generation(out: dict[str, Any], prompt_index: int, eos_id: int | None) -> Generation:
    """One SGLang ``generate`` result -> :class:`Generation`.

    ``out`` is ``{"output_ids": [...], "meta_info": {"finish_reason": {"type": "stop" | "length" | "abort", ...},
    "output_token_logprobs": [(logprob, token_id, text_or_None), ...], ...}}`` (tuples arrive as lists over HTTP).
    ``output_ids`` keep the stop token. A response counts as finished when it stopped on a stop token, or when its last
    token is EOS (SGLang reports ``length`` if EOS lands exactly on ``max_new_tokens``; the HF engine calls that
    finished too).
    """
    meta = out.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":
        raise RuntimeError(f"SGLang aborted the request for prompt {prompt_index}: {reason.get('message', reason)}")
    ids = [int(t) for t in out["output_ids"]]
    pairs = meta.get("output_token_logprobs")
    logprobs = None
    if pairs is not None:
        got = [int(p[1]) for p in pairs]
        if got != ids:
            raise RuntimeError(f"SGLang returned log-probs for tokens {got[:8]}... but output ids {ids[:8]}... "
                               f"({len(got)} vs {len(ids)}) for prompt {prompt_index}; is the server's "
                               "streaming/incremental output mode on? This engine needs whole outputs")
        logprobs = [float(p[0]) for p in pairs]
    finished = kind == "stop" or (bool(ids) and ids[-1] == eos_id)
    return Generation(prompt_index, ids, logprobs, finished)


def request_params(params: SamplingParams, eos_id: int | None, n_requests: int) -> list[dict[str, Any]]:
    """SGLang ``sampling_params``, one dict per request (``n`` is expanded by the caller, one request per sample)."""
    base: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                            "top_p": params.top_p, "top_k": params.top_k, "skip_special_tokens": False}
    if eos_id is not None:
        base["stop_token_ids"] = [eos_id]
    out = [dict(base) for _ in range(n_requests)]
    if params.seed is not None:
        for i, p in enumerate(out):
            p["sampling_seed"] = params.seed + i
    return out


class SGLangHTTPClient:
    """The few ``sglang.Engine`` methods we use, against a running SGLang server (stdlib HTTP, JSON)."""

    def __init__(self, url: str, timeout_s: float = 3600.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _post(self, route: str, payload: dict[str, Any]) -> Any:
        req = urllib.request.Request(f"{self.url}{route}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"SGLang server {self.url}{route} answered {e.code}: {e.read()[:500]!r}") from None
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach the SGLang server at {self.url} ({e.reason}); is rollout.sglang_url "
                               "right and the server running?") from None
        return json.loads(body) if body else None

    def generate(self, **request: Any) -> Any:
        return self._post("/generate", request)

    def update_weights_from_disk(self, model_path: str) -> Any:
        return self._post("/update_weights_from_disk", {"model_path": model_path})

    def release_memory_occupation(self) -> Any:
        return self._post("/release_memory_occupation", {})

    def resume_memory_occupation(self) -> Any:
        return self._post("/resume_memory_occupation", {})

    def flush_cache(self) -> Any:
        return self._post("/flush_cache", {})

    def shutdown(self) -> None:
        """The server belongs to whoever started it; nothing to do."""


def _check_update(result: Any, what: str) -> None:
    """SGLang's weight-update calls answer ``(success, message, ...)`` in process or ``{"success": ..}`` over HTTP."""
    if isinstance(result, dict):
        ok, msg = result.get("success", True), result.get("message", "")
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    else:
        return
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {msg}")


class SGLangEngine(RolloutEngine):
    def __init__(self, model_path: str | Path, tokenizer: Any, cfg: Config, *, engine: Any = None):
        """``engine``: an object with ``sglang.Engine``'s methods to use instead of starting one (tests pass a fake)."""
        self.model_path = Path(model_path)
        self.eos_id = tokenizer.eos_token_id
        self.engine = engine if engine is not None else self._start(cfg)
        self.remote = isinstance(self.engine, SGLangHTTPClient)

    def _start(self, cfg: Config) -> Any:
        if cfg.rollout.sglang_url:
            return SGLangHTTPClient(cfg.rollout.sglang_url)
        sglang = import_sglang()
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"  # log-probs before temperature (module docstring)
        return sglang.Engine(
            model_path=str(self.model_path), skip_tokenizer_init=True, dtype=cfg.model.dtype,
            mem_fraction_static=cfg.rollout.sglang_mem_fraction, random_seed=cfg.run.seed,
            trust_remote_code=cfg.model.trust_remote_code, enable_memory_saver=cfg.backend.colocate_rollout)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        jobs = [i for i in range(len(prompts)) for _ in range(params.n)]  # one request per sample, prompt-major
        if not jobs:
            return []
        outs = self.engine.generate(input_ids=[prompts[i] for i in jobs], return_logprob=True,
                                    sampling_params=request_params(params, self.eos_id, len(jobs)))
        if isinstance(outs, dict):  # a batch of one may come back unwrapped
            outs = [outs]
        if len(outs) != len(jobs):
            raise RuntimeError(f"SGLang returned {len(outs)} results for {len(jobs)} requests")
        return [to_generation(o, i, self.eos_id) for o, i in zip(outs, jobs)]

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        if self.remote:
            self._update_through_disk(named_tensors)
            return
        bucket: list[tuple[str, Tensor]] = []
        size = 0
        for name, t in named_tensors:
            bucket.append((name, t.detach()))
            size += t.numel() * t.element_size()
            if size >= BUCKET_BYTES:
                _check_update(self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False),
                              "update_weights_from_tensor")
                bucket, size = [], 0
        if bucket:
            _check_update(self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False),
                          "update_weights_from_tensor")
        self.engine.flush_cache()  # cached prefixes hold KV computed with the old weights

    def _update_through_disk(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp(prefix="lampo_sglang_sync_"))
        try:
            tensors = {n: t.detach().contiguous().cpu() for n, t in named_tensors}
            save_file(tensors, str(folder / "model.safetensors"))
            shutil.copy(self.model_path / "config.json", folder / "config.json")
            self.update_weights_from_path(str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def update_weights_from_path(self, path: str) -> None:
        _check_update(self.engine.update_weights_from_disk(model_path=str(path)), "update_weights_from_disk")

    def release_memory(self) -> None:
        """Free the KV cache and weights' GPU memory while the colocated trainer runs (needs the engine started with
        ``enable_memory_saver``, which ``backend.colocate_rollout`` turns on). The weights are not guaranteed to
        survive: call :meth:`update_weights` after :meth:`reacquire_memory`, as the RL loop's sync does anyway."""
        self.engine.release_memory_occupation()

    def reacquire_memory(self) -> None:
        self.engine.resume_memory_occupation()

    def shutdown(self) -> None:
        self.engine.shutdown()
