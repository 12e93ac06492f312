"""The launch planner: the process layout and per-GPU memory of a config on a cluster, without a GPU or any weights.

    python -m pipeline plan CONFIG [key=value ...] [--nodes N] [--gpus-per-node G] [--gpu-memory-gib M]

Only the model's ``config.json`` is read (:func:`read_model_config`): a local checkpoint folder, the copy shipped in
``pipeline/model_configs/`` for a known hub id, else ``transformers.AutoConfig`` (which fetches config.json alone).
The plan prints the layout, the memory of training and of rollout per GPU, and the tokens of one RL iteration; a layout
that cannot divide the model or the world, or cannot fit the GPU, is refused with one line naming the numbers
(:class:`PlanError`, exit status 2).

Every figure below is an estimate from closed formulas, written out here so that it can be checked by hand.
``P`` is the parameter count (:func:`count_parameters`), ``1 GiB = 2**30 bytes``.

Parameters (:func:`count_parameters`, analytic, checked against models built on the meta device):

* embedding ``V*h``; the output projection another ``V*h`` unless ``tie_word_embeddings`` (a tied matrix counts once);
* per layer: attention ``h*(n_q*d) + 2*h*(n_kv*d) + (n_q*d)*h`` (grouped-query: ``n_kv`` key/value heads of size
  ``d``), plus the Q/K/V biases ``n_q*d + 2*n_kv*d`` for Qwen2 (and the output bias too where ``attention_bias`` adds
  one, Llama), plus two ``d``-sized RMSNorm weights for Qwen3's q/k norm; SwiGLU MLP ``3*h*I`` (plus ``2*I + h`` with
  ``mlp_bias``); two RMSNorm weights ``2*h``;
* the final norm ``h``.

Training state per GPU (``P_gpu`` = the parameters this GPU holds: ``P`` for DeepSpeed and torch; for Megatron the
largest pipeline stage's ``L/PP`` layers with their matrices split ``1/TP`` and norms replicated, plus the
vocabulary-parallel embedding ``V_pad*h/TP`` on the first stage and the output layer on the last):

* Megatron (``pipeline/backends/megatron_backend``), ``backend.bf16``: bf16 weights ``2*P_gpu``, fp32 master weights
  ``4*P_gpu``, fp32 accumulated gradients ("main grads") ``4*P_gpu``, AdamW moments ``8*P_gpu``, divided by DP with
  ``distributed_optimizer`` (this backend partitions only the moments, with ``ZeroRedundancyOptimizer`` - ZeRO-1 -
  while the fp32 masters and gradients stay whole on every DP rank: 10 B/param unsharded + 8/DP, not megatron-core's
  ``(4 + 12/DP)``). Without bf16 the fp32 weights are the masters: ``4 + 4 + 8(/DP)`` B/param.
* DeepSpeed ZeRO (mixed-precision Adam as in the ZeRO paper, ``K = 12`` B/param of fp32 master + moments): bf16 weights
  ``2*P``, bf16 gradients ``2*P``, optimizer ``12*P``; stage 1 divides the optimizer by DP, stage 2 the gradients too,
  stage 3 the weights too (plus one gathered layer, ``2*P_layer``); ``offload_optimizer`` moves the 12 B/param to the
  host. Without bf16: fp32 weights and gradients (4 + 4) and moments 8 (the weights are the masters).
* torch: one process, weights, gradients and both AdamW moments in ``model.dtype``: ``4*e*P``.
* with ``rl.algorithm.kl_coef > 0`` a frozen reference model: ``e*P_gpu`` (Megatron: sharded like the policy;
  DeepSpeed: a whole unsharded copy on every GPU, as the backend builds it).

Activations per GPU, for ``b = backend.micro_batch_size`` sequences of ``s = data.max_prompt_tokens +
rollout.max_new_tokens`` tokens (``sft.max_seq_len`` when it is longer and the run has an SFT stage), ``e`` = 2 bytes in
bf16, 4 in fp32, attention by SDPA/flash (no ``s x s`` score matrix kept). Saved tensors per layer and token:

* outside attention and MLP (the two norms' inputs and outputs): ``4*h`` elements, split over TP only with
  ``sequence_parallel``;
* attention: q and k before and after RoPE, v, and the attention output: ``3*n_q*d + 3*n_kv*d`` elements, ``/TP``;
* SwiGLU MLP: gate and up outputs, ``silu(gate)`` and the product fed to the down projection: ``4*I`` elements, ``/TP``;

so ``A_layer = s*b*e*(4*h/SPTP + (3*n_q*d + 3*n_kv*d + 4*I)/TP)``. Without recomputation a GPU keeps ``L`` layers'
worth (with pipeline parallelism 1F1B keeps up to PP micro-batches in flight on the first stage, each for ``L/PP``
layers, which is again ``L``). With ``recompute_activations`` (full recomputation / HF gradient checkpointing) it keeps
each layer's input, ``L*s*b*e*h/SPTP``, plus one layer's ``A_layer`` while that layer is recomputed. The logits add
``s*b*V/TP*(e + 4 + 4)`` bytes: the logits, their fp32 copy (kept by ``logsumexp`` for the backward,
``pipeline/backends/common.py``) and its fp32 gradient. A fixed :data:`RESERVE_GIB` per GPU stands for the CUDA
context, NCCL buffers and allocator fragmentation.

Rollout (SGLang, ``rollout.engine=sglang`` without ``sglang_urls``): engines of ``k = rollout.tensor_parallel`` GPUs
(1 where the config has no such field: ``engine_kwargs`` passes no ``tp_size``), so a world of W GPUs holds ``W / k``
engine groups. SGLang sizes its share once, when it starts, from what the trainer (built first) leaves:
``share = sglang_mem_fraction * (GPU - trainer_at_start)`` with ``trainer_at_start`` = the weights and fp32 masters
(Megatron), the weights and fp32 master partitions (DeepSpeed), the weights (torch), plus any reference model. The
share holds the engine's weights, ``e*P/k`` per GPU, and its KV cache, ``2*L*max(1, n_kv/k)*d*e`` bytes per token per
GPU, so ``floor((share - e*P/k) / (KV_token * (prompt + new)))`` sequences of full length run at once per engine. With
``rollout.colocate`` trainer and engine take turns on a GPU: during a rollout the trainer keeps what it does
not move to the host (Megatron: its model weights; DeepSpeed ZeRO 1-3: nothing but a reference model,
``offload_states``; ZeRO-0 and torch: everything), and during training SGLang has released its memory; a GPU then holds
``kept + share + reserve``. Without colocation it holds ``training peak + share`` at once. The HF engine (CPU, tests)
runs inside the trainer's process and gets no separate budget; external servers (``sglang_urls``) none either.

Where the figures come from: the model's config.json (:func:`read_model_config`: never the hub for the shipped
families), turned into ``pipeline.validate``'s ``ModelShape``, whose checks (context length, TP/PP against heads,
key/value heads, layers and world, the Megatron family mapping, batches against DP) are reused unchanged
(:func:`model_checks`); the parameter count and memory figures are this module's.

Tokens per iteration: ``rl.prompts_per_iteration * rollout.n_samples * (prompt + new)`` at most (responses stop early).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checks import PipelineError
from pipeline.config import Config, ConfigError, TinyModelConfig, _build, apply_overrides, load_config
from pipeline.validate import check_context, check_layout, shape_from_hf, validate_names

GIB = 2**30
RESERVE_GIB = 2.0  # per GPU: CUDA context, NCCL buffers, allocator fragmentation
MODEL_CONFIGS = Path(__file__).parent / "model_configs"  # shipped config.json copies, folder ORG--NAME per hub id


class PlanError(ValueError):
    """A layout that cannot divide the model or the world, or cannot fit the GPU; the message names the numbers."""


# --------------------------------------------------------------------------------------------------------------------
# the model's shape


def shipped_config_dir(model_id: str) -> Path | None:
    """The folder of the shipped config.json copy for hub id ``ORG/NAME``, if there is one."""
    if model_id.count("/") != 1:
        return None
    d = MODEL_CONFIGS / model_id.replace("/", "--")
    return d if (d / "config.json").is_file() else None


def read_model_config(path: str, *, tiny: Any = None, trust_remote_code: bool = False) -> tuple[dict[str, Any], str]:
    """The model's config as a dict, and where it was read: never weights, never more than config.json.

    ``tiny``: the built-in model's Qwen2 config (shape from ``tiny``, a ``TinyModelConfig``); a local folder: its
    config.json; a hub id with a shipped copy in ``pipeline/model_configs``: that copy; any other hub id:
    ``transformers.AutoConfig`` (fetches config.json only).
    """
    if path == "tiny":
        from pipeline.tiny.model import tiny_qwen2_config
        from pipeline.tiny.tokenizer import build_tokenizer

        return tiny_qwen2_config(tiny or TinyModelConfig(), build_tokenizer()).to_dict(), "built-in tiny model"
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text()), str(local)
    shipped = shipped_config_dir(path)
    if shipped is not None:
        return json.loads((shipped / "config.json").read_text()), f"shipped copy pipeline/model_configs/{shipped.name}"
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure to reach the config is one message
        raise PlanError(f"model.path={path!r}: cannot read its config.json ({type(e).__name__}: {e}); give a local "
                        "checkpoint folder or a reachable hub id") from None
    return c.to_dict(), f"{path} (AutoConfig, config.json only)"


def _rope_partial(c: dict[str, Any]) -> float:
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    v = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    return float(v if v is not None else c.get("partial_rotary_factor") or 1.0)


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a decoder-only transformer, read from its config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q, k and v
    o_bias: bool  # bias on the attention output projection
    qk_norm: bool  # RMSNorm over each q and k head (Qwen3)
    mlp_bias: bool
    max_position_embeddings: int
    partial_rotary_factor: float

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> Shape:
        mt = c.get("model_type", "?")
        heads = int(c["num_attention_heads"])
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            intermediate_size=int(c["intermediate_size"]),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o_proj; Llama-style attention_bias puts one on all four;
            # Phi-3's fused qkv_proj and o_proj have none
            qkv_bias=mt == "qwen2" or (attention_bias and mt != "phi3"),
            o_bias=attention_bias and mt not in ("qwen2", "phi3", "qwen3"),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            mlp_bias=bool(c.get("mlp_bias", False)),
            max_position_embeddings=int(c.get("max_position_embeddings") or 0),
            partial_rotary_factor=_rope_partial(c),
        )


@dataclass(frozen=True)
class ParamCount:
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    per_layer_tp: int  # the part of a layer that tensor parallelism splits (matrices and their biases)
    per_layer_replicated: int  # the part every TP rank keeps whole (norms)
    num_layers: int
    final_norm: int

    @property
    def per_layer(self) -> int:
        return self.per_layer_tp + self.per_layer_replicated

    @property
    def total(self) -> int:
        """Distinct parameters (a tied embedding counted once), what ``model.parameters()`` yields."""
        return self.embedding + self.lm_head + self.num_layers * self.per_layer + self.final_norm

    @property
    def stored(self) -> int:
        """With a tied embedding counted twice, as a checkpoint that also writes ``lm_head.weight`` stores it."""
        return self.total + (self.embedding if self.lm_head == 0 else 0)


def count_parameters(s: Shape) -> ParamCount:
    """Parameter counts from the shape alone (formulas in the module docstring)."""
    h, d, q, kv = s.hidden_size, s.head_dim, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attn = h * q + 2 * h * kv + q * h
    attn += (q + 2 * kv) if s.qkv_bias else 0
    attn += h if s.o_bias else 0
    mlp = 3 * h * s.intermediate_size + ((2 * s.intermediate_size + h) if s.mlp_bias else 0)
    replicated = 2 * h + (2 * d if s.qk_norm else 0)
    emb = s.vocab_size * h
    return ParamCount(embedding=emb, lm_head=0 if s.tie_word_embeddings else emb, per_layer_tp=attn + mlp,
                      per_layer_replicated=replicated, num_layers=s.num_layers, final_norm=h)


# --------------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Plan:
    lines: list[str]
    problems: list[str]  # empty: the layout fits
    figures: dict[str, float]  # GiB per GPU and counts, for tests and RESULTS.md

    def text(self) -> str:
        return "\n".join(self.lines)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def hf_config_of(model_config: dict[str, Any]) -> Any:
    """A ``transformers`` config object for a config.json dict (offline: no hub access)."""
    from transformers import AutoConfig

    c = {k: v for k, v in model_config.items() if not k.startswith("_")}
    return AutoConfig.for_model(c.pop("model_type"), **c)


def model_checks(cfg: Config, vshape: Any, world: int) -> tuple[list[str], list[str]]:
    """``pipeline.validate``'s config-time checks, reused: (layout problems, context problems).

    Layout: TP/PP against attention heads, key/value heads, layers and the world size (the Megatron backend's own
    ``check_layout``), the Megatron mapping of the family (``arch_from_hf``: partial rotary, sliding window...), and
    batches smaller than DP. Context: prompt budget + new tokens of rollouts and evaluation, and ``sft.max_seq_len``,
    against the model's context as SGLang derives it."""
    return check_layout(cfg, vshape, world), check_context(cfg, vshape)


def make_plan(cfg: Config, cluster: Cluster, model_config: dict[str, Any], source: str = "",
              vshape: Any = None) -> Plan:
    """The plan of ``cfg`` on ``cluster`` for the model described by ``model_config`` (a config.json dict).
    ``vshape``: the model's ``pipeline.validate.ModelShape`` (built from ``model_config`` when not given)."""
    s = Shape.from_config(model_config)
    if vshape is None:
        vshape = shape_from_hf(hf_config_of(model_config), cfg.model.path)
    pc = count_parameters(s)
    b, ro, rl, data = cfg.backend, cfg.rollout, cfg.rl, cfg.data
    gpu = cluster.gpu_memory_gib * GIB
    world = cluster.world
    figures: dict[str, float] = {}
    out: list[str] = []

    out.append(f"model     {cfg.model.path} ({s.model_type}; config: {source or 'given'})")
    out.append(f"          {_count(pc.total)} parameters: embedding {_count(pc.embedding)}"
               + (" (tied to the output layer)" if pc.lm_head == 0 else f", output layer {_count(pc.lm_head)}")
               + f", {s.num_layers} layers x {_count(pc.per_layer)}; {s.num_heads} heads / {s.num_kv_heads} KV "
               f"heads x {s.head_dim}, hidden {s.hidden_size}, MLP {s.intermediate_size}, vocab {s.vocab_size}, "
               f"context {vshape.context} ({vshape.context_source or 'unknown'})")
    figures["params"] = pc.total
    layout_problems, problems = model_checks(cfg, vshape, world)
    if layout_problems:  # the memory figures of a layout that cannot be built would mean nothing
        return Plan(out, layout_problems + problems, figures)

    prompt, new = data.max_prompt_tokens, ro.max_new_tokens
    rl_len = prompt + new
    seq = max(rl_len, cfg.sft.max_seq_len) if "sft" in cfg.run.stages else rl_len  # training sequence length

    # --- layout ---------------------------------------------------------------------------------------------------
    name = b.name
    if name == "torch":
        tp = pp = dp = 1
        layout = "1 process (the torch backend does not distribute; use deepspeed or megatron for more GPUs)"
    else:
        tp, pp = b.tensor_parallel, b.pipeline_parallel
        dp = world // (tp * pp)
        layout = f"TP {tp} x PP {pp} x DP {dp} = {tp * pp * dp} processes"
    out.append(f"cluster   {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs x {cluster.gpu_memory_gib:g} GiB "
               f"= world {world}")
    opts = [o for o, on in (("sequence parallel", b.sequence_parallel and name == "megatron"),
                            ("recompute", b.recompute_activations), ("bf16", b.bf16),
                            ("distributed optimizer", b.distributed_optimizer and name == "megatron"),
                            (f"ZeRO-{b.zero_stage}", name == "deepspeed"),
                            ("optimizer offload", b.offload_optimizer and name == "deepspeed")) if on]
    out.append(f"training  {name}: {layout}" + (f"; {', '.join(opts)}" if opts else ""))

    # --- training memory per GPU ----------------------------------------------------------------------------------
    half = cfg.model.dtype in ("bfloat16", "float16")
    e = (2 if half else 4) if name == "torch" else (2 if b.bf16 else 4)  # bytes of a weight / activation element
    if name == "megatron":
        v_pad = -(-s.vocab_size // tp) * tp
        layers = (s.num_layers // pp) * (pc.per_layer_tp // tp + pc.per_layer_replicated)
        emb = v_pad * s.hidden_size // tp
        first = layers + emb + (0 if pp > 1 or pc.lm_head == 0 else emb) + (pc.final_norm if pp == 1 else 0)
        last = layers + pc.final_norm + emb  # the output layer (a tied one keeps its own copy on the last stage)
        p_gpu = first if pp == 1 else max(first, last)
        w = e * p_gpu
        master = 4 * p_gpu if b.bf16 else 0
        grads = 4 * p_gpu
        opt = 8 * p_gpu / (dp if b.distributed_optimizer else 1)
        state = {"weights": w, "fp32 master": master, "fp32 grads": grads,
                 "Adam moments" + (f" /DP{dp}" if b.distributed_optimizer and dp > 1 else ""): opt}
        retained_in_rollout = w  # release_memory moves moments, masters and the reference to the host
        trainer_at_start = w + master  # when the engine starts: AdamW creates its moments at the first step
        ref, ref_stays = e * p_gpu, False
    elif name == "deepspeed":
        p_gpu = pc.total
        k_opt = 12 if b.bf16 else 8  # fp32 master + two moments, or the moments alone (fp32 weights)
        w, grads, opt = e * p_gpu, e * p_gpu, k_opt * p_gpu
        z = b.zero_stage
        if z >= 1:
            opt /= dp
        if z >= 2:
            grads /= dp
        if z >= 3:
            w = w / dp + e * pc.per_layer  # plus the layer being gathered
        if b.offload_optimizer:
            opt = 0
        state = {"weights" + (f" /DP{dp}" if z >= 3 else ""): w, "grads" + (f" /DP{dp}" if z >= 2 else ""): grads,
                 ("optimizer (offloaded)" if b.offload_optimizer else "optimizer") + (f" /DP{dp}" if z >= 1 else ""):
                     opt}
        retained_in_rollout = 0 if z >= 1 else w + grads + opt  # ZeRO 1-3: offload_states moves all of it
        trainer_at_start = w + (opt * 4 / k_opt if b.bf16 else 0)  # the fp32 master partitions exist from initialize on
        ref, ref_stays = e * pc.total, True  # the reference is a whole copy on every GPU, kept there
    else:  # torch
        p_gpu = pc.total
        state = {"weights": e * p_gpu, "grads": e * p_gpu, "Adam moments": 2 * e * p_gpu}
        retained_in_rollout = sum(state.values())
        trainer_at_start = e * p_gpu
        ref, ref_stays = e * p_gpu, True
    if rl.algorithm.kl_coef > 0 and "rl" in cfg.run.stages:
        state["reference"] = ref
        trainer_at_start += ref
        retained_in_rollout += ref if ref_stays else 0
    if "rl" not in cfg.run.stages:
        trainer_at_start = 0  # evaluation or rollout alone: no trainer beside the engine

    mb = b.micro_batch_size
    sp_split = tp if (name == "megatron" and b.sequence_parallel) else 1
    q_dim, kv_dim = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    per_layer_act = seq * mb * e * (4 * s.hidden_size / sp_split
                                    + (3 * q_dim + 3 * kv_dim + 4 * s.intermediate_size) / tp)
    full_act = s.num_layers * per_layer_act
    ckpt_act = s.num_layers * seq * mb * e * s.hidden_size / sp_split + per_layer_act
    act = ckpt_act if b.recompute_activations else full_act
    logits = seq * mb * (s.vocab_size / tp) * (e + 4 + 4)
    reserve = RESERVE_GIB * GIB
    static = sum(state.values())
    train_peak = static + act + logits + reserve
    parts = " + ".join(f"{k} {_gib(v)}" for k, v in state.items())
    out.append(f"          per GPU ({_count(p_gpu)} parameters held): {parts} GiB")
    out.append(f"          activations at micro-batch {mb} x {seq} tokens: {_gib(act)} GiB "
               + (f"with recompute ({_gib(full_act)} without)" if b.recompute_activations
                  else f"without recompute ({_gib(ckpt_act)} with)")
               + f" + logits {_gib(logits)} + reserve {RESERVE_GIB:g}")
    out.append(f"          training peak {_gib(train_peak)} GiB of {cluster.gpu_memory_gib:g} GiB per GPU")
    figures.update(train_static_gib=static / GIB, train_act_gib=act / GIB, train_act_no_recompute_gib=full_act / GIB,
                   train_peak_gib=train_peak / GIB, logits_gib=logits / GIB)
    if train_peak > gpu and {"sft", "rl"} & set(cfg.run.stages):
        problems.append(f"training needs {_gib(train_peak)} GiB per GPU ({_gib(static)} state + {_gib(act)} "
                        f"activations + {_gib(logits)} logits + {RESERVE_GIB:g} reserve) but a GPU has "
                        f"{cluster.gpu_memory_gib:g} GiB")

    # --- rollout --------------------------------------------------------------------------------------------------
    seqs = rl.prompts_per_iteration * ro.n_samples
    if ro.engine == "sglang" and not ro.sglang_urls:
        k = ro.tensor_parallel
        if world % k or s.num_heads % k:
            problems.append(f"rollout.tensor_parallel={k} must divide the world size {world} and the {s.num_heads} "
                            "attention heads")
            k = 1
        engines = world // k
        frac = ro.sglang_mem_fraction
        share = frac * (gpu - trainer_at_start)  # SGLang sizes its share from the memory left when it starts
        e_r = 2 if half else 4  # SGLang serves in model.dtype (engine_kwargs), its KV cache in the same dtype
        weights = e_r * pc.total / k
        kv_token = 2 * s.num_layers * max(1, s.num_kv_heads // k) * s.head_dim * e_r  # per GPU of an engine
        kv_budget = share - weights
        concurrent = int(kv_budget // (kv_token * rl_len)) if kv_budget > 0 else 0
        out.append(f"rollout   sglang: world {world} / rollout TP {k} = {engines} engine group(s) of {k} GPU(s)")
        out.append(f"          per GPU {frac:g} x ({cluster.gpu_memory_gib:g} - trainer {_gib(trainer_at_start)}) = "
                   f"{_gib(share)} GiB: weights {_gib(weights)} + KV cache {_gib(max(kv_budget, 0))} GiB at "
                   f"{kv_token / 1024:.0f} KiB/token -> {concurrent} concurrent sequences of {rl_len} tokens per "
                   f"engine ({seqs} per iteration: {math.ceil(seqs / concurrent) if concurrent else '-'} wave(s) on "
                   f"one engine, {math.ceil(seqs / (concurrent * engines)) if concurrent else '-'} on {engines})")
        figures.update(rollout_weights_gib=weights / GIB, kv_gib=max(kv_budget, 0) / GIB,
                       concurrent_sequences=concurrent, rollout_share_gib=share / GIB)
        if kv_budget <= 0:
            problems.append(f"rollout: {_gib(weights)} GiB of weights per GPU do not fit SGLang's share, "
                            f"rollout.sglang_mem_fraction={frac:g} x ({cluster.gpu_memory_gib:g} - trainer "
                            f"{_gib(trainer_at_start)}) = {_gib(share)} GiB")
        elif concurrent < 1:
            problems.append(f"rollout: the KV cache of {_gib(kv_budget)} GiB per GPU holds less than one sequence of "
                            f"{rl_len} tokens ({_gib(kv_token * rl_len)} GiB); raise rollout.sglang_mem_fraction or "
                            "shorten the sequences")
        if cfg.rollout.colocate:
            held = retained_in_rollout + share + reserve
            out.append(f"          colocated: during a rollout a GPU holds the trainer's {_gib(retained_in_rollout)} "
                       f"GiB + SGLang {_gib(share)} + reserve {RESERVE_GIB:g} = {_gib(held)} GiB")
        else:
            held = train_peak + share
            out.append(f"          not colocated: a GPU holds training {_gib(train_peak)} + SGLang {_gib(share)} = "
                       f"{_gib(held)} GiB")
        figures["rollout_gpu_gib"] = held / GIB
        if held > gpu:
            problems.append(f"a rollout GPU needs {_gib(held)} GiB (trainer {_gib(held - share)} + SGLang "
                            f"{_gib(share)}) but a GPU has {cluster.gpu_memory_gib:g} GiB")
    else:
        where = f"servers {', '.join(ro.sglang_urls)}" if ro.sglang_urls else "engine in the trainer's process"
        out.append(f"rollout   {ro.engine} {where}: no rollout memory on the trainer's GPUs is planned")

    tokens = seqs * rl_len
    figures["tokens_per_iteration"] = tokens
    out.append(f"tokens    {rl.prompts_per_iteration} prompts x {ro.n_samples} samples x ({prompt} + {new}) = "
               f"{tokens:,} per iteration at most")
    return Plan(out, problems, figures)


# --------------------------------------------------------------------------------------------------------------------
# command line


def load_for_plan(config: str, overrides: list[str], world: int) -> tuple[Config, dict[str, Any], str]:
    """The config as a run on ``world`` processes would load it, with the model's config.json and its source.

    ``validate_names`` checks the layout against ``WORLD_SIZE`` and, for Megatron, against the heads and layers it
    reads from ``model.path/config.json``; so the config is loaded with ``WORLD_SIZE=world`` and, for a hub id, with
    ``model.path`` pointing at a folder holding that config.json (the shipped copy, or the one AutoConfig fetched),
    then ``model.path`` is put back.
    """
    import tempfile

    import yaml

    p = Path(config)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    data = apply_overrides(yaml.safe_load(p.read_text()) or {}, overrides)
    model = data.get("model") or {}
    path = str(model.get("path", "tiny"))
    tiny = None
    if path == "tiny":
        tiny = _build(TinyModelConfig, model.get("tiny") or {}, "model.tiny")
    model_config, source = read_model_config(path, tiny=tiny, trust_remote_code=bool(model.get("trust_remote_code")))
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            extra: list[str] = []
            if path != "tiny" and not (Path(path) / "config.json").is_file():
                (Path(tmp) / "config.json").write_text(json.dumps(model_config))
                extra = [f"model.path={tmp}"]
                if not model.get("tokenizer"):
                    extra.append(f"model.tokenizer={path}")
            cfg = validate_names(load_config(config, list(overrides) + extra))
        cfg.model.path = path
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old
    return cfg, model_config, source


def plan_config(config: str, overrides: list[str], cluster: Cluster) -> Plan:
    cfg, model_config, source = load_for_plan(config, overrides, cluster.world)
    return make_plan(cfg, cluster, model_config, source)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. backend.tensor_parallel=2")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")


def plan_command(args: argparse.Namespace) -> int:
    """Print the plan; exit 2 with one line on stderr when the config or the layout is refused."""
    if args.nodes < 1 or args.gpus_per_node < 1 or args.gpu_memory_gib <= 0:
        print(f"error: --nodes {args.nodes}, --gpus-per-node {args.gpus_per_node} and --gpu-memory-gib "
              f"{args.gpu_memory_gib:g} must be positive", file=sys.stderr)
        return 2
    try:
        plan = plan_config(args.config, args.overrides, Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib))
    except (ConfigError, PipelineError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.text())
    if plan.problems:
        print("error: refused: " + "; ".join(plan.problems), file=sys.stderr)
        return 2
    print("ok        the layout divides and fits")
    return 0
