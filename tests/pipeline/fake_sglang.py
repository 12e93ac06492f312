"""A stateful CPU stand-in for ``sglang`` 0.5.21 (the release pinned in requirements-gpu.txt): put this module in
``sys.modules["sglang"]`` and ``sglang.Engine(model_path=...)`` loads the Hugging Face checkpoint on CPU and samples
real tokens with real log-probs, while enforcing the rules of the real engine that the pipeline can break. Written from
the release's source (paths inside its wheel):

* ``Engine`` methods and their keywords: ``sglang/srt/entrypoints/engine.py`` (class ``Engine``). A keyword the real
  method lacks is a ``TypeError`` here too, because the signatures below use the same names;
* memory release/resume: ``SchedulerWeightUpdaterManager.release_memory_occupation`` /
  ``resume_memory_occupation`` (``sglang/srt/managers/scheduler_components/weight_updater.py``). ``tags=None`` means
  all of ``GPU_MEMORY_ALL_TYPES`` (``sglang/srt/constants.py``); release asserts the scheduler is idle and adds the tags
  to ``offload_tags``; resume does ``offload_tags.remove(tag)``, a ``KeyError`` for a tag never released. Such an
  exception is raised in the scheduler process, which then dies and takes the engine with it: this fake marks itself
  dead and refuses every later call. Releasing the weights twice is refused too: the second release would clone the
  model's buffers (``_export_static_state``) out of memory the first release unmapped. Generating or loading weights
  while memory is released is refused (the real engine would touch unmapped memory). The weights do not survive a
  release (no ``enable_weights_cpu_backup``): after resuming them, generation is refused until every parameter was
  loaded again (the real engine would sample from garbage);
* the weight-update session (new in 0.5.21): ``update_weights_from_tensor`` answers ``(False, "... must run between
  begin_weight_update() and end_weight_update()")`` outside ``begin_weight_update()`` / ``end_weight_update()``; a
  second ``begin`` or an ``end`` without ``begin`` answer ``success=False`` (same file). ``update_weights_from_disk``
  needs no session and flushes the cache itself (``UpdateWeightFromDiskReqInput.flush_cache`` defaults to True,
  ``sglang/srt/managers/io_struct.py``) and answers ``(success, message, num_paused_requests)``
  (``TokenizerManager.update_weights_from_disk``); ``flush_cache`` answers a ``FlushCacheReqOutput`` with
  ``success``/``message``;
* the output record: with ``skip_tokenizer_init`` each result is ``{"output_ids": [...], "meta_info": {"id",
  "finish_reason", "prompt_tokens", ..., "output_token_logprobs": [(logprob, token_id, None), ...], "completion_tokens",
  ...}}`` (``TokenizerManager._handle_batch_output`` and ``detokenize_logprob_tokens``,
  ``sglang/srt/managers/tokenizer_manager.py``); ``finish_reason`` is ``{"type": "stop", "matched": id}`` or
  ``{"type": "length", "length": n}`` (``FINISH_MATCHED_TOKEN`` / ``FINISH_LENGTH``,
  ``sglang/srt/managers/schedule_batch.py``); the matched stop token stays in ``output_ids``. A batch of prompts gives a
  list, one prompt (a flat ``input_ids``) a dict;
* sampling: ``sampling_seed`` is used only with ``enable_deterministic_inference`` (missing seeds default to 42,
  ``SamplingBatchInfo.from_schedule_batch``, ``sglang/srt/sampling/sampling_batch_info.py``); otherwise draws come from
  one engine-wide generator, so they depend on everything sampled before. Log-probs are ``log_softmax(logits)`` when
  ``SGLANG_RETURN_ORIGINAL_LOGPROB`` was set when the engine started, else ``log_softmax(logits / temperature)``
  (``sglang/srt/layers/sampler.py``). ``top_k=-1`` means the whole vocabulary.

``Engine.log`` records every call as ``(method, keywords)`` for tests.
"""
from __future__ import annotations

import glob
import io
import os
import pickle
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, ClassVar

import torch
import torch.multiprocessing  # registers torch's tensor reductions with ForkingPickler

__version__ = "0.5.21"

GPU_MEMORY_ALL_TYPES = ["kv_cache", "weights", "cuda_graph"]  # sglang/srt/constants.py
SESSION_REQUIRED = ("update_weights_from_tensor must run between begin_weight_update() and end_weight_update()")


@dataclass
class FlushCacheReqOutput:  # sglang/srt/managers/io_struct.py
    success: bool
    message: str = ""


class SchedulerDied(RuntimeError):
    """The scheduler process raised and exited; the real engine is unusable afterwards."""


class Engine:
    instances: ClassVar[list[Engine]] = []  # every engine created, for tests

    def __init__(self, **kwargs: Any):
        from transformers import AutoModelForCausalLM

        self.server_args = kwargs
        self.log: list[tuple[str, dict[str, Any]]] = [("__init__", dict(kwargs))]
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model_path"], torch_dtype=torch.float32).eval()
        self.params = dict(self.model.named_parameters())  # tied weights appear once
        self.deterministic = bool(kwargs.get("enable_deterministic_inference", False))
        self.memory_saver = bool(kwargs.get("enable_memory_saver", False))
        self.original_logprob = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")
        seed = kwargs.get("random_seed")
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.offload_tags: set[str] = set()
        self.session: dict[str, Any] | None = None
        self.reloaded: set[str] | None = None  # None: weights valid; a set: names loaded since the weights resumed
        self.dead: str | None = None
        self.running = 0
        self.flushes = 0
        Engine.instances.append(self)

    # --- bookkeeping --------------------------------------------------------------------------------------------------
    def _enter(self, method: str, kwargs: dict[str, Any]) -> None:
        self.log.append((method, kwargs))
        if self.dead:
            raise SchedulerDied(f"sglang.Engine.{method}: the scheduler process is dead ({self.dead})")

    def _die(self, why: str) -> SchedulerDied:
        self.dead = why
        return SchedulerDied(f"scheduler process exited: {why}")

    def _require_memory(self, what: str) -> None:
        if self.offload_tags:
            raise self._die(f"{what} while memory {sorted(self.offload_tags)} is released (unmapped GPU memory)")

    # --- generation ---------------------------------------------------------------------------------------------------
    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False, *, stream=False):
        self._enter("generate", dict(input_ids=input_ids, sampling_params=sampling_params,
                                     return_logprob=return_logprob))
        if prompt is not None:
            raise ValueError("this engine was started with skip_tokenizer_init: pass input_ids, not text")
        self._require_memory("generate")
        if self.reloaded is not None:
            missing = sorted(set(self.params) - self.reloaded)
            raise RuntimeError(f"generate after resume_memory_occupation without reloading the weights (no CPU backup; "
                               f"{len(missing)} parameters still garbage, e.g. {missing[:3]})")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        batch = [input_ids] if single else list(input_ids)
        sps = sampling_params if isinstance(sampling_params, list) else [dict(sampling_params or {})] * len(batch)
        if len(sps) != len(batch):
            raise ValueError(f"{len(sps)} sampling_params for {len(batch)} prompts")
        self.running += 1
        try:
            outs = [self._one(list(p), sp, bool(return_logprob), k) for k, (p, sp) in enumerate(zip(batch, sps))]
        finally:
            self.running -= 1
        return outs[0] if single else outs

    @torch.no_grad()
    def _one(self, prompt: list[int], sp: dict[str, Any], return_logprob: bool, k: int) -> dict[str, Any]:
        # a subset of sglang/srt/sampling/sampling_params.py
        known = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "skip_special_tokens",
                 "sampling_seed", "min_p", "ignore_eos", "n", "min_new_tokens"}
        if set(sp) - known:
            raise ValueError(f"unknown sampling params {sorted(set(sp) - known)}")
        max_new = sp.get("max_new_tokens", 128)
        temperature, top_p, top_k = sp.get("temperature", 1.0), sp.get("top_p", 1.0), sp.get("top_k", -1)
        stops = set(sp.get("stop_token_ids") or [])
        eos = self.model.config.eos_token_id
        if eos is not None and not sp.get("ignore_eos", False):
            stops |= set(eos if isinstance(eos, list) else [eos])
        if self.deterministic:
            seed = sp.get("sampling_seed")
            gen = torch.Generator().manual_seed(seed if seed is not None else 42)
        else:
            gen = self.generator
        ids, lps, reason = [], [], None
        for _ in range(max_new):  # no KV cache: the tiny model recomputes the prefix, simpler than any cache API
            logits = self.model(input_ids=torch.tensor([prompt + ids])).logits[0, -1].float()
            if len(ids) < sp.get("min_new_tokens", 0) and stops:  # the min-new-tokens penalizer: stop tokens get -inf
                logits[list(stops)] = float("-inf")  # (sglang/srt/sampling/penaltylib/min_new_tokens.py)
            if temperature <= 1e-5:
                tok = int(logits.argmax())
                lp_all = torch.log_softmax(logits, -1)
            else:
                scaled = logits / temperature
                probs = torch.softmax(scaled, -1)
                if 0 < top_k < probs.numel():
                    probs = torch.where(probs >= probs.topk(top_k).values[-1], probs, torch.zeros_like(probs))
                if top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p > top_p
                    probs = probs.scatter(0, order[drop], 0.0)
                tok = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
                lp_all = torch.log_softmax(logits if self.original_logprob else scaled, -1)
            ids.append(tok)
            lps.append(float(lp_all[tok]))
            if tok in stops:
                reason = {"type": "stop", "matched": tok}
                break
        if reason is None:
            reason = {"type": "length", "length": max_new}
        meta: dict[str, Any] = {"id": f"fake-{len(self.log)}-{k}", "finish_reason": reason,
                                "prompt_tokens": len(prompt), "weight_version": "default", "num_retractions": 0}
        if return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(lps, ids)]
            meta["output_token_logprobs_length"] = len(ids)
        meta.update(reasoning_tokens=0, completion_tokens=len(ids), cached_tokens=0)
        return {"output_ids": ids, "meta_info": meta}

    # --- weights ------------------------------------------------------------------------------------------------------
    def begin_weight_update(self, selector: str = "all"):
        self._enter("begin_weight_update", dict(selector=selector))
        if self.session is not None:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = {"selector": selector, "loaded_weights": False}
        return True, "Success"

    def end_weight_update(self):
        self._enter("end_weight_update", {})
        if self.session is None:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = None
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        if not isinstance(named_tensors, list):  # typed List[Tuple[str, Tensor]]; a generator does not pickle
            raise TypeError(f"named_tensors must be a list of (name, tensor), not {type(named_tensors).__name__}")
        self._enter("update_weights_from_tensor", dict(named_tensors=[n for n, _ in named_tensors],
                                                       load_format=load_format, flush_cache=flush_cache))
        if load_format is not None:
            raise NotImplementedError(f"fake: load_format={load_format!r}")
        # Engine._serialize_tensors_per_rank pickles the list with torch's ForkingPickler (MultiprocessingSerializer,
        # sglang/srt/utils/common.py) before the scheduler sees it; do the same round trip (CPU tensors only: a CUDA IPC
        # handle cannot be opened by the process that made it, and the fake runs in the caller's process)
        if not any(t.is_cuda for _, t in named_tensors):
            buf = io.BytesIO()
            ForkingPickler(buf).dump(named_tensors)
            named_tensors = pickle.loads(buf.getvalue())
        if self.session is None:
            return False, SESSION_REQUIRED
        ok, msg = self._load(list(named_tensors), "update_weights_from_tensor")
        if ok:
            self.session["loaded_weights"] = True
            if flush_cache:
                self.flushes += 1
        return ok, msg

    def update_weights_from_disk(self, model_path: str, load_format=None):
        self._enter("update_weights_from_disk", dict(model_path=model_path, load_format=load_format))
        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
        if not files:
            return False, f"Failed to get weights iterator: no safetensors in {model_path}.", 0
        tensors = [item for f in files for item in load_file(f).items()]
        ok, msg = self._load(tensors, "update_weights_from_disk")
        if ok:
            self.flushes += 1  # flush_cache=True by default
        return ok, msg, 0

    def _load(self, named_tensors: list[tuple[str, torch.Tensor]], what: str) -> tuple[bool, str]:
        self._require_memory(what)
        for name, t in named_tensors:
            if name not in self.params:
                if name == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
                    continue  # a tied head is the embedding (the real loaders skip it too)
                return False, f"Failed to update parameter online: unknown parameter {name}"
            p = self.params[name]
            if tuple(p.shape) != tuple(t.shape):
                return False, (f"Failed to update parameter online: {name} has shape {tuple(t.shape)}, "
                               f"not {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t.to(p.device, p.dtype))
            if self.reloaded is not None:
                self.reloaded.add(name)
        if self.reloaded is not None and self.reloaded >= set(self.params):
            self.reloaded = None
        return True, "Success"

    def flush_cache(self):
        self._enter("flush_cache", {})
        if self.running:
            return FlushCacheReqOutput(False, "running requests")
        self.flushes += 1
        return FlushCacheReqOutput(True)

    # --- memory -------------------------------------------------------------------------------------------------------
    def release_memory_occupation(self, tags=None):
        self._enter("release_memory_occupation", dict(tags=tags))
        tags = list(tags) if tags else list(GPU_MEMORY_ALL_TYPES)
        if self.running:
            raise self._die("AssertionError: release_memory_occupation should be called only when server is idle.")
        if "weights" in tags and "weights" in self.offload_tags:
            raise self._die("release of weights already released: _export_static_state reads unmapped memory")
        self.offload_tags.update(tags)
        return None

    def resume_memory_occupation(self, tags=None):
        self._enter("resume_memory_occupation", dict(tags=tags))
        tags = list(tags) if tags else list(GPU_MEMORY_ALL_TYPES)
        for tag in tags:
            if tag not in self.offload_tags:
                raise self._die(f"KeyError: {tag!r} (offload_tags.remove on a tag that was not released)")
            self.offload_tags.remove(tag)
        if "weights" in tags:
            self.reloaded = set()
        return None

    def shutdown(self):
        self.log.append(("shutdown", {}))
        self.dead = self.dead or "shut down"
