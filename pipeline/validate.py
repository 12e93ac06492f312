"""Config-time checks beyond the schema's own value checks (:func:`pipeline.config.validate`, which ``load_config``
runs), each raising one :class:`~pipeline.config.ConfigError` line naming the fields:

* :func:`validate_names`: the names a config gives (stages, advantage estimator, policy loss, loss aggregation, KL
  estimator, rewards, training backend, rollout engine, LamPO pair weight) against the live registries that define
  them, so a new estimator, loss or backend needs no edit to the schema, and the chosen backend's own layout rules
  (:meth:`~pipeline.backends.base.TrainingBackend.validate_config`). The schema module imports no other module of the
  project, so these checks live here; every entry point that loads a config for real use calls this right after
  ``load_config`` (the runner, ``python -m pipeline plan``, ``python -m evaluation``, the benchmark scripts).
* :func:`validate_cluster`: what would otherwise fail only on the cluster, minutes into a run: sequence lengths against
  the model's context, the parallel layout against the world size and the model's heads and layers, and the split of
  a GPU's memory between an in-process SGLang engine and the trainer. These need the model's own ``config.json`` (read
  with ``transformers.AutoConfig`` from the local folder or the hub, without weights; for ``model.path=tiny`` the shape
  comes from ``model.tiny``), so the runner calls :func:`validate_cluster` after the config is loaded and before any
  stage. Every problem found is reported in one line naming the fields and the numbers; only the fields the configured
  stages use are checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lampo.advantages import ADVANTAGE_ESTIMATORS, PAIR_WEIGHTS
from lampo.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from lampo.rewards import REWARDS
from pipeline import dist
from pipeline.backends import BACKENDS, backend_class
from pipeline.checks import PipelineError, require_model_dir
from pipeline.config import ConfigError, get_path, one_of
from pipeline.rollout import ENGINES
from pipeline.stages import STAGES

if TYPE_CHECKING:
    from pipeline.config import Config

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the keys SGLang reads a context length from, in its order (sglang 0.5.21, utils/hf_transformers/common.py)
CONTEXT_KEYS = ("max_sequence_length", "seq_length", "max_seq_len", "model_max_length", "max_position_embeddings")


# --------------------------------------------------------------------------------------------------------------------
# names against the registries


def validate_names(cfg: Config) -> Config:
    """Check every name of ``cfg`` against the registry that defines it, then the backend's own layout rules (e.g.
    TP x PP x DP against ``WORLD_SIZE``, heads divisible by TP); raise ConfigError naming the field and the names
    allowed. Returns ``cfg``, so that ``cfg = validate_names(load_config(...))`` reads as one step."""
    for st in cfg.run.stages:
        one_of(st, list(STAGES), "run.stages[]")
    for path, reg in (("rl.algorithm.advantage", ADVANTAGE_ESTIMATORS), ("rl.algorithm.policy_loss", POLICY_LOSSES),
                      ("rl.algorithm.loss_agg", LOSS_AGGREGATIONS), ("rl.algorithm.kl_estimator", KL_ESTIMATORS),
                      ("rl.reward.outcome", REWARDS), ("backend.name", BACKENDS), ("rollout.engine", ENGINES)):
        one_of(get_path(cfg, path), sorted(reg), path)
    one_of(cfg.rl.algorithm.lampo_weight, PAIR_WEIGHTS, "rl.algorithm.lampo_weight")
    if cfg.rl.reward.dense is not None:
        one_of(cfg.rl.reward.dense, sorted(REWARDS), "rl.reward.dense")
    # backend-specific layout checks (heads divisible by TP, ...) live with the backend class
    backend_class(cfg.backend.name).validate_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------------
# the model's shape


@dataclass(frozen=True)
class ModelShape:
    """What the checks need to know about the model, read from its config without loading weights."""

    name: str  # model.path, for messages
    model_type: str
    num_heads: int
    num_kv_heads: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool
    context: int | None  # tokens one sequence (prompt + response) may hold; None when the config names none
    context_source: str = ""  # e.g. "max_position_embeddings=4096"
    hf_config: Any = None  # the transformers config (None for the tiny model)

    @property
    def num_params(self) -> int:
        """Parameters of a decoder of this shape (attention, SwiGLU MLP, norms, embeddings; biases not counted)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h


def context_length(hf_config: Any) -> tuple[int | None, str]:
    """The context length as SGLang derives it (``get_context_length``): the first of :data:`CONTEXT_KEYS` that the
    config sets, times a RoPE scaling factor unless the scaling names its original length or is Llama-3 style."""
    rope = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None)
    factor = 1
    if isinstance(rope, dict) and "original_max_position_embeddings" not in rope and rope.get("rope_type") != "llama3":
        factor = rope.get("factor", 1) or 1
    for key in CONTEXT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            where = f"{key}={value}" + (f" x RoPE scaling factor {factor}" if factor != 1 else "")
            return int(value * factor), where
    return None, ""


def shape_from_hf(hf_config: Any, name: str) -> ModelShape:
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = c.num_attention_heads
    context, where = context_length(c)
    return ModelShape(
        name=name, model_type=getattr(c, "model_type", "?"), num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads, num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size, intermediate_size=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
        vocab_size=c.vocab_size, head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)), context=context, context_source=where,
        hf_config=hf_config)


def model_shape(cfg: Config) -> ModelShape:
    """The configured model's shape: ``model.tiny`` for ``tiny``, else its config.json (local folder or hub id)."""
    path = cfg.model.path
    if path == "tiny":
        t = cfg.model.tiny
        return ModelShape(name="tiny", model_type="qwen2", num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                          num_layers=t.num_layers, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                          vocab_size=0,  # the character tokenizer's few hundred entries are not worth building it
                          head_dim=t.hidden_size // t.num_heads, tie_word_embeddings=t.tie_word_embeddings,
                          context=t.max_position_embeddings,
                          context_source=f"model.tiny.max_position_embeddings={t.max_position_embeddings}")
    from transformers import AutoConfig

    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            require_model_dir(local)  # raises the runner's usual message for a folder without config.json
        source = str(local)
    elif path.count("/") == 1 and not path.startswith((".", "/")):
        source = path  # a hub id: only config.json is fetched (or read from the cache)
    else:
        require_model_dir(path)  # raises: does not exist
        source = path
    try:
        hf = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loading failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"model.path={path!r}: cannot read its config.json ({first})") from None
    return shape_from_hf(hf, path)


# --------------------------------------------------------------------------------------------------------------------
# the checks; each returns a list of one-line problems


def _stages(cfg: Config) -> set[str]:
    return set(cfg.run.stages)


def _evaluates(cfg: Config) -> bool:
    return "evaluate" in _stages(cfg) or ("rl" in _stages(cfg) and cfg.rl.eval_every > 0)


def check_context(cfg: Config, shape: ModelShape) -> list[str]:
    """Prompt budget + new tokens of rollouts and of every evaluation benchmark, and ``sft.max_seq_len``, against the
    model's context. SGLang refuses a request whose prompt plus ``max_new_tokens`` exceeds it (tokenizer_manager); HF
    ``generate`` runs past ``max_position_embeddings`` on positions the model was never trained on."""
    if shape.context is None:
        return []
    ctx, prompt = shape.context, cfg.data.max_prompt_tokens
    of = f"the {ctx}-token context of model.path={shape.name!r} ({shape.context_source})"
    problems = []
    if _stages(cfg) & {"rl", "rollout"}:
        total = prompt + cfg.rollout.max_new_tokens
        if total > ctx:
            problems.append(f"data.max_prompt_tokens={prompt} + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                            f"= {total} tokens exceed {of}")
    if _evaluates(cfg):
        total = prompt + cfg.eval.max_new_tokens
        if total > ctx:
            problems.append(f"eval.benchmarks {', '.join(cfg.eval.benchmarks)}: data.max_prompt_tokens={prompt} "
                            f"(the prompt budget) + eval.max_new_tokens={cfg.eval.max_new_tokens} = {total} tokens "
                            f"exceed {of}")
    if "sft" in _stages(cfg) and cfg.sft.max_seq_len > ctx:
        problems.append(f"sft.max_seq_len={cfg.sft.max_seq_len} exceeds {of}")
    if problems:
        problems[-1] += "; lower the lengths or use a model with a longer context"
    return problems


def data_parallel(cfg: Config, world_size: int) -> int | None:
    """Data-parallel degree of the backend at ``world_size``; None when the world cannot be split."""
    b = cfg.backend
    if b.name == "megatron":
        per_replica = b.tensor_parallel * b.pipeline_parallel
        return world_size // per_replica if world_size % per_replica == 0 else None
    return world_size if b.name == "deepspeed" else 1


def rollout_tp(cfg: Config) -> int:
    """GPUs per rollout engine (``rollout.tensor_parallel``; 1 for a config without that field)."""
    return cfg.rollout.tensor_parallel


def external_engine(cfg: Config) -> bool:
    """Whether rollouts go to already running SGLang servers (``rollout.sglang_urls``), which do not
    share this job's GPUs."""
    return bool(cfg.rollout.sglang_urls)


def check_layout(cfg: Config, shape: ModelShape, world_size: int) -> list[str]:
    """TP/PP/DP against the world size and the model's attention heads, key/value heads and layers (megatron: the
    backend's own :func:`~pipeline.backends.megatron_backend.parallel.check_layout`, here also for hub ids), the
    megatron mapping of the model family, batches that leave a data-parallel rank without sequences, and the rollout
    engines' tensor parallelism (SGLang splits the attention heads over its ``tp_size`` GPUs)."""
    b, problems = cfg.backend, []
    k = rollout_tp(cfg)
    if (k > 1 and cfg.rollout.engine == "sglang" and not external_engine(cfg)
            and (shape.num_heads % k or world_size % k)):
        problems.append(f"rollout.tensor_parallel={k} must divide the {shape.num_heads} attention heads of "
                        f"model.path={shape.name!r} and the world size {world_size}")
    if b.name == "megatron":
        from pipeline.backends.megatron_backend.parallel import Layout
        from pipeline.backends.megatron_backend.parallel import check_layout as megatron_layout

        try:
            megatron_layout(Layout(b.tensor_parallel, b.pipeline_parallel), num_heads=shape.num_heads,
                            num_kv_heads=shape.num_kv_heads, num_layers=shape.num_layers, world_size=world_size)
        except ValueError as e:
            problems.append(f"backend (model.path={shape.name!r}): {e}")
        if shape.hf_config is not None:
            from pipeline.backends.megatron_backend.model import arch_from_hf

            try:
                arch_from_hf(shape.hf_config)
            except ValueError as e:
                problems.append(f"backend.name=megatron, model.path={shape.name!r}: {e}")
    elif b.tensor_parallel != 1 or b.pipeline_parallel != 1:
        problems.append(f"backend.tensor_parallel={b.tensor_parallel}, pipeline_parallel={b.pipeline_parallel}: "
                        f"backend.name={b.name} is not model-parallel; set both to 1 or use backend=megatron")
    dp = data_parallel(cfg, world_size)
    if dp and dp > 1:
        batches = [("rl.mini_batch_size", cfg.rl.mini_batch_size, "rl"), ("sft.batch_size", cfg.sft.batch_size, "sft")]
        for path, size, stage in batches:
            if stage in _stages(cfg) and size < dp:
                problems.append(f"{path}={size} is smaller than the {dp} data-parallel ranks of world size "
                                f"{world_size} with backend.name={b.name}: a rank would get no sequences")
    return problems


@dataclass(frozen=True)
class TrainerMemory:
    """Lower bounds of one GPU's trainer memory (weights and optimizer state only: no activations, no CUDA context,
    no communication buffers), in bytes."""

    at_start: int  # when the rollout engine starts, right after the backend is built (AdamW moments come later)
    training: int  # during an optimizer step


def trainer_memory(cfg: Config, shape: ModelShape, world_size: int) -> TrainerMemory:
    """Per-GPU lower bounds for the configured backend (Megatron: the parameters split evenly over TP x PP)."""
    b, n = cfg.backend, shape.num_params
    reference = cfg.rl.algorithm.kl_coef > 0
    if b.name == "megatron":
        shard = n // max(1, b.tensor_parallel * b.pipeline_parallel)
        dp = data_parallel(cfg, world_size) or 1
        param = 2 if b.bf16 else 4
        weights = shard * param + (shard * 4 if b.bf16 else 0)  # bf16 parameters + fp32 masters
        start = weights + (shard * param if reference else 0)
        adam = shard * 8 // (dp if b.distributed_optimizer else 1)
        return TrainerMemory(start, start + adam)
    if b.name == "deepspeed":
        dp, z = max(1, world_size), b.zero_stage
        param = 2 if b.bf16 else 4
        params = n * param // (dp if z == 3 else 1)
        offload = b.offload_optimizer  # fp32 masters and moments live on the host
        master = 0 if offload or not b.bf16 else n * 4 // (dp if z >= 1 else 1)
        adam = 0 if offload else n * 8 // (dp if z >= 1 else 1)
        start = params + master + (n * param if reference else 0)
        return TrainerMemory(start, start + adam)
    param = DTYPE_BYTES[cfg.model.dtype]  # torch: the HF model in model.dtype on the GPU, AdamW state alike
    start = n * param * (2 if reference else 1)
    return TrainerMemory(start, start + 3 * n * param)  # + gradients + two moments


def check_memory(cfg: Config, shape: ModelShape, world_size: int, gpu_memory: int | None) -> list[str]:
    """The GPU memory split between in-process SGLang engines and the trainer on the same GPUs.

    SGLang sizes its KV cache once, at start, from ``rollout.sglang_mem_fraction`` of the memory then free (sglang
    0.5.21, ``kv_cache_configurator._profile_available_bytes``): its weights (split over ``rollout.tensor_parallel``
    GPUs) must fit in that share with room to spare. In the RL stage the trainer is built first and keeps its weights
    there. With ``rollout.colocate`` the two take turns (each releases its memory while the other runs);
    without it they hold their memory at once, so the trainer's optimizer step must fit in what SGLang's share leaves.
    Checked only where the GPU's memory is known (``gpu_memory`` bytes), against lower bounds of what each side needs
    (weights and optimizer state; no activations), so only combinations that cannot work are refused."""
    r, b = cfg.rollout, cfg.backend
    uses_engine = _stages(cfg) & {"rl", "rollout", "evaluate"}
    if r.engine != "sglang" or external_engine(cfg) or not uses_engine or gpu_memory is None:
        return []
    weights = shape.num_params * DTYPE_BYTES[cfg.model.dtype] // rollout_tp(cfg)
    trainer = trainer_memory(cfg, shape, world_size) if "rl" in _stages(cfg) else TrainerMemory(0, 0)
    share = r.sglang_mem_fraction * (gpu_memory - trainer.at_start)
    problems = []
    beside = f" of the {_gib(gpu_memory - trainer.at_start)} a GPU has left beside the trainer's " \
        f"{_gib(trainer.at_start)}" if trainer.at_start else f" of a GPU's {_gib(gpu_memory)}"
    if weights >= share:
        split = f" per GPU over rollout.tensor_parallel={rollout_tp(cfg)}" if rollout_tp(cfg) > 1 else ""
        problems.append(f"rollout.sglang_mem_fraction={r.sglang_mem_fraction}{beside} is {_gib(share)}, not more "
                        f"than the {_gib(weights)} of {cfg.model.dtype} weights{split} of model.path={shape.name!r} "
                        "(no room for SGLang's KV cache); raise rollout.sglang_mem_fraction")
    if "rl" in _stages(cfg):
        if cfg.rollout.colocate:
            if trainer.training > gpu_memory:
                problems.append(f"backend.name={b.name}: the trainer needs at least {_gib(trainer.training)} per GPU "
                                f"(weights and optimizer state) but a GPU has {_gib(gpu_memory)}; use more model or "
                                "data parallelism")
        else:
            left = gpu_memory - share
            if trainer.training > left:
                problems.append(f"rollout.colocate=false: SGLang keeps rollout.sglang_mem_fraction="
                                f"{r.sglang_mem_fraction}{beside} ({_gib(share)}) while the trainer steps, leaving "
                                f"{_gib(left)}, less than the trainer's {_gib(trainer.training)} (weights and "
                                "optimizer state); set rollout.colocate=true or lower the fraction")
    return problems


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def gpu_memory_of_this_rank() -> int | None:
    """Total memory of this process's GPU in bytes; None without CUDA. Call after :func:`pipeline.dist.init` picked
    the device, so no rank touches another's GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def validate_cluster(cfg: Config, *, world_size: int | None = None, gpu_memory: int | None = None,
                     shape: ModelShape | None = None) -> ModelShape:
    """Run every check; raise one ConfigError line listing every problem. ``world_size``: default the launch's
    (``pipeline.dist.world_size``); ``gpu_memory`` (bytes): default this rank's GPU, none on CPU (memory unchecked)."""
    world_size = dist.world_size() if world_size is None else world_size
    if gpu_memory is None:
        gpu_memory = gpu_memory_of_this_rank()
    shape = model_shape(cfg) if shape is None else shape
    problems = (check_context(cfg, shape) + check_layout(cfg, shape, world_size)
                + check_memory(cfg, shape, world_size, gpu_memory))
    if problems:
        raise ConfigError("; ".join(problems))
    return shape

