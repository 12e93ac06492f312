"""SGLang rollout engine (GPU only): continuous-batched sampling with per-token log-probs, in-memory weight sync, and
memory release for colocation with the trainer. Written against the release pinned in ``requirements-gpu.txt``
(``sglang==0.5.21``); the upstream files cited below are paths inside that release's wheel.

Two ways to reach SGLang, behind the same methods:

* ``rollout.sglang_urls`` empty (default): an in-process offline engine per rollout group
  (:mod:`pipeline.rollout.groups`), ``sglang.Engine(model_path=..., tp_size=rollout.tensor_parallel,
  base_gpu_id=<the group leader's LOCAL_RANK>, mem_fraction_static=rollout.sglang_mem_fraction,
  skip_tokenizer_init=True, ...)`` (:func:`engine_kwargs`), on the GPUs of the group's ranks;
* ``rollout.sglang_urls`` set: already running ``sglang.launch_server`` instances reached over HTTP
  (:data:`HTTP_ROUTES`), one per rollout group (e.g. one per node, or an ``sglang-router`` in front of several).
  Tensors cannot travel over HTTP, so :meth:`SGLangEngine.update_weights` writes them as a checkpoint folder
  (safetensors + the model's config.json) and asks the server to load it: the server must see this machine's file
  system (same host or a shared disk).

Every call into SGLang goes through :meth:`SGLangEngine._call`, which refuses a method or keyword not listed in
:data:`ENGINE_API`; ``tests/pipeline/test_sglang_contract.py`` checks that list, :data:`HTTP_ROUTES`, the
``sampling_params`` keys and :func:`engine_kwargs` against the pinned release's source, so the list cannot drift from
the code nor the code from the release.

Weight sync (in process). Since 0.5.21 ``update_weights_from_tensor`` answers ``success=False`` unless it runs inside a
weight-update session (``SchedulerWeightUpdaterManager.update_weights_from_tensor`` checks ``self._session``,
``sglang/srt/managers/scheduler_components/weight_updater.py``), so a sync is ``begin_weight_update()``, the buckets
(``flush_cache=False``), ``end_weight_update()`` (always, even after a failed bucket: a session left open makes the
next ``begin`` fail), then one ``flush_cache()`` (cached prefixes hold KV computed with the old weights). Each bucket is
a plain ``[(name, tensor), ...]`` list with ``load_format=None``: ``Engine._serialize_tensors_per_rank``
(``sglang/srt/entrypoints/engine.py``) pickles it once per TP rank with ``MultiprocessingSerializer`` (torch's
``ForkingPickler``). That pickling moves a CPU tensor's storage into shared memory (``/dev/shm``, 64 MB by default in
containers, so a large bucket fails or the sync crawls), while a CUDA tensor travels as a CUDA IPC handle (no copy,
torch records an event the receiver waits on). So when CUDA is available every tensor is first moved to the current
CUDA device, one bucket of about :data:`BUCKET_BYTES` at a time (the trainer may have offloaded its weights to CPU for
the rollout), and the bucket is dropped once SGLang has loaded it; the sync never depends on ``/dev/shm``'s size.
Over HTTP, ``/update_weights_from_disk`` needs no session (only the tensor and distributed updates check it).

Memory release (``rollout.colocate``). The engine starts holding its memory. SGLang's scheduler keeps the
released tags in a set: ``resume_memory_occupation`` does ``offload_tags.remove(tag)`` (``KeyError`` on a tag that was
never released) and ``release_memory_occupation`` asserts the scheduler is idle; an exception in the scheduler process
kills the engine. So this class tracks the state: :meth:`reacquire_memory` on a live engine and :meth:`release_memory`
on a released one are no-ops, a release while :meth:`generate` runs is refused, and generating or syncing weights on a
released engine is refused. The weights do not survive a release (no ``enable_weights_cpu_backup``; the memory saver
unmaps them), so after :meth:`reacquire_memory` :meth:`generate` is refused until the weights were synced again (the RL
loop syncs right after it anyway).

Log-probs: our :class:`Generation` contract is the log-prob of each sampled token under the model *before*
temperature. SGLang reports ``log_softmax(logits / temperature)`` unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set
(``sglang/srt/layers/sampler.py``, read when the scheduler process imports it), so we set it before starting the
in-process engine (for a server started elsewhere, start it with that variable set; at temperature 1 the two agree).
All requests of a call are submitted at once and SGLang batches them continuously (``rollout.batch_size`` is the HF
engine's knob and is not used here).

Seeds: ``SamplingParams.seed`` becomes each request's ``sampling_seed`` (seed + request index), but SGLang uses it only
with ``enable_deterministic_inference`` (``SamplingBatchInfo.from_schedule_batch`` builds the seed tensor only then,
``sglang/srt/sampling/sampling_batch_info.py``). ``rollout.sglang_deterministic=true`` turns that mode on; without it
samples are not reproducible and a resumed run does not repeat the samples an uninterrupted run would have drawn.

SGLang is an optional dependency, imported only here, and cannot be installed on the CPU machines this project is
tested on: the tests drive this class against a stateful fake written from the release's source
(``tests/pipeline/fake_sglang.py``), alone and inside the RL stage; the real GPU path is not exercised by the suite.
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

import torch
from torch import Tensor

from evaluation.engine import Generation, RolloutEngine, SamplingParams
from lampo.seeds import derive_seed
from pipeline.rollout.groups import RolloutGroups

if TYPE_CHECKING:
    from pipeline.config import Config

INSTALL_HINT = ("rollout.engine=sglang needs SGLang, an optional GPU-only dependency that is not installed. On a CUDA "
                "machine: pip install -r requirements-gpu.txt (the pinned sglang release; see "
                "https://docs.sglang.ai/get_started/install.html); on CPU use rollout.engine=hf")
BUCKET_BYTES = 1 << 30  # weight-sync bucket size for update_weights_from_tensor (GPU memory held during a sync)

# The memory tags this engine releases and resumes, all of them (sglang/srt/constants.py GPU_MEMORY_ALL_TYPES).
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")

# Every sglang.Engine method this module calls, with the keywords it passes ("__init__": the constructor's keywords,
# which sglang.Engine forwards to ServerArgs). _call enforces it; the contract test checks it against the release.
ENGINE_API: dict[str, tuple[str, ...]] = {
    "__init__": ("model_path", "tp_size", "base_gpu_id", "skip_tokenizer_init", "dtype", "mem_fraction_static",
                 "random_seed",
                 "trust_remote_code", "enable_memory_saver", "enable_deterministic_inference"),
    "generate": ("input_ids", "sampling_params", "return_logprob"),
    "begin_weight_update": (),
    "update_weights_from_tensor": ("named_tensors", "flush_cache"),
    "end_weight_update": (),
    "flush_cache": (),
    "update_weights_from_disk": ("model_path",),
    "release_memory_occupation": ("tags",),
    "resume_memory_occupation": ("tags",),
    "shutdown": (),
}

# The server routes for the methods the HTTP path uses (sglang/srt/entrypoints/http_server.py); the JSON body is the
# method's keywords, so it is checked against ENGINE_API too. Tensor updates do not travel over HTTP.
HTTP_ROUTES: dict[str, str] = {
    "generate": "/generate",
    "update_weights_from_disk": "/update_weights_from_disk",
    "release_memory_occupation": "/release_memory_occupation",
    "resume_memory_occupation": "/resume_memory_occupation",
    "flush_cache": "/flush_cache",
}


def import_sglang() -> Any:
    """The ``sglang`` module, or an ImportError that says it is optional and how to install it."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return sglang


def engine_kwargs(model_path: str | Path, cfg: Config) -> dict[str, Any]:
    """The keywords for ``sglang.Engine(...)`` (``ServerArgs`` field names in the pinned release). The engine spans
    ``rollout.tensor_parallel`` GPUs from this rank's (its group leader's) local GPU on: SGLang places TP worker i on
    GPU ``base_gpu_id + i`` (``gpu_id_step`` 1)."""
    k, local_world = cfg.rollout.tensor_parallel, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world % k:
        raise ValueError(f"rollout.tensor_parallel={k} must divide the {local_world} GPUs per node: a rollout "
                         "engine cannot span two nodes")
    return dict(model_path=str(model_path), tp_size=k, base_gpu_id=int(os.environ.get("LOCAL_RANK", "0")),
                skip_tokenizer_init=True, dtype=cfg.model.dtype,
                mem_fraction_static=cfg.rollout.sglang_mem_fraction, random_seed=derive_seed(cfg.run.seed, "init"),
                trust_remote_code=cfg.model.trust_remote_code, enable_memory_saver=cfg.rollout.colocate,
                enable_deterministic_inference=cfg.rollout.sglang_deterministic)


def to_generation(out: dict[str, Any], prompt_index: int, eos_id: int | None) -> Generation:
    """One SGLang ``generate`` result -> :class:`Generation`.

    ``out`` is ``{"output_ids": [...], "meta_info": {"finish_reason": {"type": "stop" | "length" | "abort", ...},
    "output_token_logprobs": [(logprob, token_id, text_or_None), ...], ...}}`` (tuples arrive as lists over HTTP; with
    ``skip_tokenizer_init`` there is no ``"text"``: ``TokenizerManager._handle_batch_output``,
    ``sglang/srt/managers/tokenizer_manager.py``). ``output_ids`` keep the stop token. A response counts as finished
    when it stopped on a stop token, or when its last token is EOS (SGLang reports ``length`` if EOS lands exactly on
    ``max_new_tokens``; the HF engine calls that finished too).
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
    """SGLang ``sampling_params``, one dict per request (``n`` is expanded by the caller, one request per sample).
    The keys are ``SamplingParams`` fields of ``sglang/srt/sampling/sampling_params.py`` (top_k -1 = whole
    vocabulary)."""
    base: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens,
                            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                            "skip_special_tokens": False}
    if eos_id is not None:
        base["stop_token_ids"] = [eos_id]
    out = [dict(base) for _ in range(n_requests)]
    if params.seed is not None:
        for i, p in enumerate(out):
            p["sampling_seed"] = params.seed + i
    return out


class SGLangHTTPClient:
    """The ``sglang.Engine`` methods of :data:`HTTP_ROUTES`, against a running SGLang server (stdlib HTTP, JSON):
    ``client.method(**kw)`` posts ``kw`` as the JSON body to the method's route."""

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
            raise RuntimeError(f"cannot reach the SGLang server at {self.url} ({e.reason}); is rollout.sglang_urls "
                               "right and the server running?") from None
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:  # /flush_cache answers plain text ("Cache flushed. ..."), its status says how it went
            return body.decode(errors="replace")

    def __getattr__(self, method: str) -> Any:
        if method not in HTTP_ROUTES:
            raise AttributeError(f"the SGLang HTTP path has no route for {method!r} (routes: {sorted(HTTP_ROUTES)})")
        route = HTTP_ROUTES[method]
        return lambda **kw: self._post(route, kw)

    def shutdown(self) -> None:
        """The server belongs to whoever started it; nothing to do."""


def _check_update(result: Any, what: str) -> None:
    """SGLang's control calls answer ``(success, message, ...)`` in process (``TokenizerControlMixin``), an object with
    ``.success`` (``FlushCacheReqOutput``) or ``{"success": ..}`` over HTTP (a failure is also an HTTP 400 there)."""
    if isinstance(result, dict):
        ok, msg = result.get("success", True), result.get("message", "")
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(getattr(result, "success", None), bool):
        ok, msg = result.success, getattr(result, "message", "")
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
        self.released = False  # memory handed back with release_memory_occupation (a new engine holds its memory)
        self.weights_stale = False  # resumed after a release: weights are garbage until synced
        self.generating = 0  # generate calls in progress (a release must wait for an idle engine)

    def _start(self, cfg: Config) -> Any:
        if cfg.rollout.sglang_urls:  # one server per rollout group
            return SGLangHTTPClient(cfg.rollout.sglang_urls[RolloutGroups.from_config(cfg).engine_index])
        sglang = import_sglang()
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"  # log-probs before temperature (module docstring)
        kwargs = engine_kwargs(self.model_path, cfg)
        _check_api("__init__", kwargs)
        return sglang.Engine(**kwargs)

    def _call(self, method: str, **kwargs: Any) -> Any:
        """``self.engine.<method>(**kwargs)``, for a method and keywords listed in :data:`ENGINE_API` only."""
        _check_api(method, kwargs)
        return getattr(self.engine, method)(**kwargs)

    def _require_live(self, what: str) -> None:
        if self.released:
            raise RuntimeError(f"SGLang engine: cannot {what} while its memory is released; call reacquire_memory() "
                               "first")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        jobs = [i for i in range(len(prompts)) for _ in range(params.n)]  # one request per sample, prompt-major
        if not jobs:
            return []
        self._require_live("generate")
        if self.weights_stale:
            raise RuntimeError("SGLang engine: its weights did not survive release_memory(); call update_weights() "
                               "(or update_weights_from_path()) after reacquire_memory() before generating")
        self.generating += 1
        try:
            outs = self._call("generate", input_ids=[prompts[i] for i in jobs], return_logprob=params.logprobs,
                              sampling_params=request_params(params, self.eos_id, len(jobs)))
        finally:
            self.generating -= 1
        if isinstance(outs, dict):  # a batch of one may come back unwrapped
            outs = [outs]
        if len(outs) != len(jobs):
            raise RuntimeError(f"SGLang returned {len(outs)} results for {len(jobs)} requests")
        return [to_generation(o, i, self.eos_id) for o, i in zip(outs, jobs)]

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self._require_live("update weights")
        if self.remote:
            self._update_through_disk(named_tensors)
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        _check_update(self._call("begin_weight_update"), "begin_weight_update")
        try:
            bucket: list[tuple[str, Tensor]] = []
            size = 0
            for name, t in named_tensors:
                t = t.detach()
                if device is not None and t.device != device:
                    t = t.to(device)  # CUDA IPC handle instead of a /dev/shm copy (module docstring)
                bucket.append((name, t.contiguous()))
                size += t.numel() * t.element_size()
                if size >= BUCKET_BYTES:
                    self._send_bucket(bucket)
                    bucket, size = [], 0
            if bucket:
                self._send_bucket(bucket)
        finally:
            ended = self._call("end_weight_update")  # close the session even after a failed bucket
        _check_update(ended, "end_weight_update")
        _check_update(self._call("flush_cache"), "flush_cache")  # cached prefixes hold KV of the old weights
        self.weights_stale = False

    def _send_bucket(self, bucket: list[tuple[str, Tensor]]) -> None:
        _check_update(self._call("update_weights_from_tensor", named_tensors=bucket, flush_cache=False),
                      "update_weights_from_tensor")

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
        """Load a checkpoint folder. SGLang flushes its cache afterwards itself (``UpdateWeightFromDiskReqInput``
        defaults to ``flush_cache=True``) and needs no weight-update session for it."""
        self._require_live("update weights")
        _check_update(self._call("update_weights_from_disk", model_path=str(path)), "update_weights_from_disk")
        self.weights_stale = False

    def release_memory(self) -> None:
        """Free the KV cache, weights and CUDA graphs' GPU memory while the colocated trainer runs (needs the engine
        started with ``enable_memory_saver``, which ``rollout.colocate`` turns on). A no-op when already
        released; refused while a generate call runs (SGLang asserts an idle scheduler). The weights do not survive:
        call :meth:`update_weights` after :meth:`reacquire_memory`, as the RL loop's sync does anyway."""
        if self.released:
            return
        if self.generating:
            raise RuntimeError("SGLang engine: release_memory() while a generate call is running; SGLang releases "
                               "only an idle engine")
        self._call("release_memory_occupation", tags=list(MEMORY_TAGS))
        self.released = True

    def reacquire_memory(self) -> None:
        """Undo :meth:`release_memory`; a no-op on an engine that holds its memory (a new one, or one never released),
        where SGLang's resume would raise ``KeyError`` in its scheduler and bring the engine down."""
        if not self.released:
            return
        self._call("resume_memory_occupation", tags=list(MEMORY_TAGS))
        self.released = False
        self.weights_stale = True

    def shutdown(self) -> None:
        self._call("shutdown")


def _check_api(method: str, kwargs: dict[str, Any]) -> None:
    if method not in ENGINE_API:
        raise AssertionError(f"sglang.Engine.{method} is not in ENGINE_API; add it there (the contract test checks "
                             "that list against the pinned release)")
    extra = set(kwargs) - set(ENGINE_API[method])
    if extra:
        raise AssertionError(f"sglang.Engine.{method}: keywords {sorted(extra)} are not in ENGINE_API[{method!r}]")
