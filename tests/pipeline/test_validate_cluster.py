"""Config-time checks of what would fail on the cluster (pipeline.validate): sequence lengths against the model's
context, TP/PP/DP against the world size and the model's heads and layers, and the GPU memory split with SGLang.

The model is Qwen2.5-Math-7B's real config.json (tests/data/qwen2.5-math-7b, no weights): 28 heads, 4 key/value heads,
28 layers, a 4096-token context. Every refusal is one line naming the fields and the numbers.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config
from pipeline.validate import GIB, context_length, model_shape, validate_cluster

ROOT = Path(__file__).resolve().parents[2]
QWEN_MATH_7B = ROOT / "tests" / "data" / "qwen2.5-math-7b"
LAMPO_7B = ROOT / "configs" / "lampo_7b.yaml"
H100, H200 = 80 * GIB, 141 * GIB


def lampo_7b(monkeypatch, *overrides: str, world: int = 8) -> Config:
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what load_config's own layout check sees
    return load_config(LAMPO_7B, [f"model.path={QWEN_MATH_7B}", *overrides])


def refusal(cfg: Config, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        validate_cluster(cfg, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_the_shipped_model_config_reads_as_qwen2_5_math_7b():
    s = model_shape(Config(model=type(Config().model)(path=str(QWEN_MATH_7B))))
    assert (s.model_type, s.num_heads, s.num_kv_heads, s.num_layers, s.hidden_size, s.vocab_size) == (
        "qwen2", 28, 4, 28, 3584, 152064)
    assert (s.context, s.context_source) == (4096, "max_position_embeddings=4096")
    assert 7.5e9 < s.num_params < 7.7e9  # "7B": 7.62 billion with untied embeddings


@pytest.mark.parametrize("gpu_memory", [H100, H200, None])
def test_lampo_7b_config_passes_at_world_size_8_with_tp_4(monkeypatch, gpu_memory):
    cfg = lampo_7b(monkeypatch)
    assert (cfg.backend.name, cfg.backend.tensor_parallel, cfg.backend.pipeline_parallel) == ("megatron", 4, 1)
    shape = validate_cluster(cfg, world_size=8, gpu_memory=gpu_memory)
    assert shape.context == 4096


@pytest.mark.parametrize("overrides, fragments", [
    # the eval setting configs/lampo_7b.yaml had: SGLang refuses every such request
    (["eval.max_new_tokens=4096"],
     ["eval.benchmarks math500, aime24, aime25, gpqa_diamond", "data.max_prompt_tokens=1024",
      "eval.max_new_tokens=4096", "= 5120 tokens", "4096-token context", "max_position_embeddings=4096"]),
    (["rollout.max_new_tokens=3200"], ["data.max_prompt_tokens=1024 + rollout.max_new_tokens=3200 = 4224 tokens"]),
    (["run.stages=[sft,rl,evaluate]", "sft.max_seq_len=8192"], ["sft.max_seq_len=8192 exceeds the 4096-token"]),
    (["data.max_prompt_tokens=2048"], ["rollout.max_new_tokens=3072 = 5120", "eval.max_new_tokens=3072 = 5120"]),
    (["rl.eval_every=10", "run.stages=[rl]", "eval.max_new_tokens=3584"], ["eval.max_new_tokens=3584 = 4608"]),
])
def test_a_context_overflow_is_refused_naming_fields_and_numbers(monkeypatch, overrides, fragments):
    msg = refusal(lampo_7b(monkeypatch, *overrides), world_size=8, gpu_memory=None)
    for f in fragments:
        assert f in msg


def test_only_the_configured_stages_lengths_are_checked(monkeypatch):
    # sft does not run in lampo_7b.yaml, and without evaluate (and rl.eval_every=0) neither does evaluation
    validate_cluster(lampo_7b(monkeypatch, "sft.max_seq_len=8192", "run.stages=[rl]", "eval.max_new_tokens=4096"),
                     world_size=8, gpu_memory=None)


def test_tp_3_is_refused_for_28_heads_and_4_kv_heads(monkeypatch):
    cfg = lampo_7b(monkeypatch)
    cfg.backend.tensor_parallel = 3  # after load: for a local folder, load_config's megatron check refuses it too
    msg = refusal(cfg, world_size=6, gpu_memory=None)
    assert "tensor_parallel=3 does not divide 28 attention heads" in msg
    assert "tensor_parallel=3 does not divide 4 key/value heads" in msg


def test_a_hub_id_is_checked_too(monkeypatch):
    """A hub id's config.json is read through AutoConfig (here redirected to the shipped copy): TP=7 divides its
    28 heads but not its 4 KV heads, and is refused. (The megatron backend's own config check cannot see a hub model's
    shape.)"""
    import transformers

    real = transformers.AutoConfig.from_pretrained
    asked = []

    def from_pretrained(name, **kw):
        asked.append(name)
        return real(str(QWEN_MATH_7B) if name == "Qwen/Qwen2.5-Math-7B" else name, **kw)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    cfg = lampo_7b(monkeypatch)
    cfg.model.path, cfg.backend.tensor_parallel = "Qwen/Qwen2.5-Math-7B", 7
    msg = refusal(cfg, world_size=7, gpu_memory=None)
    assert asked == ["Qwen/Qwen2.5-Math-7B"]
    assert "tensor_parallel=7 does not divide 4 key/value heads" in msg and "attention heads" not in msg
    cfg.backend.tensor_parallel = 4
    validate_cluster(cfg, world_size=8, gpu_memory=H200)


def test_lampo_7b_as_shipped_loads_at_world_size_8(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert load_config(LAMPO_7B).model.path == "Qwen/Qwen2.5-Math-7B"


def test_world_size_must_split_into_tp_x_pp_x_dp(monkeypatch):
    msg = refusal(lampo_7b(monkeypatch), world_size=6, gpu_memory=None)
    assert "world size 6 is not tensor_parallel x pipeline_parallel x data_parallel = 4 x 1 x DP" in msg


def test_a_batch_smaller_than_data_parallel_is_refused(monkeypatch):
    msg = refusal(lampo_7b(monkeypatch, "rl.mini_batch_size=1"), world_size=8, gpu_memory=None)
    assert "rl.mini_batch_size=1 is smaller than the 2 data-parallel ranks of world size 8" in msg


def test_model_parallel_degrees_need_megatron(monkeypatch):
    cfg = lampo_7b(monkeypatch, "backend=torch", "backend.tensor_parallel=1", world=1)
    cfg.backend.tensor_parallel = 2  # set after load: the schema check would refuse it already for deepspeed only
    assert "backend.name=torch is not model-parallel" in refusal(cfg, world_size=1, gpu_memory=None)


def test_sglang_share_too_small_for_the_weights_is_refused(monkeypatch):
    cfg = lampo_7b(monkeypatch, "rollout.sglang_mem_fraction=0.15")
    msg = refusal(cfg, world_size=8, gpu_memory=H100)
    # 7.62e9 bf16 weights = 14.2 GiB; the trainer's TP=4 shard (bf16 + fp32 masters) = 10.6 GiB is there first
    assert "rollout.sglang_mem_fraction=0.15 of the 69.4 GiB a GPU has left beside the trainer's 10.6 GiB" in msg
    assert "is 10.4 GiB, not more than the 14.2 GiB of bfloat16 weights" in msg
    validate_cluster(cfg, world_size=8, gpu_memory=None)  # without a GPU's size the memory is not checked


def test_without_colocation_the_trainer_must_fit_beside_sglang(monkeypatch):
    cfg = lampo_7b(monkeypatch, "rollout.colocate=false", "rollout.sglang_mem_fraction=0.9")
    msg = refusal(cfg, world_size=8, gpu_memory=H100)
    assert "rollout.colocate=false" in msg and "rollout.sglang_mem_fraction=0.9" in msg
    assert "leaving 17.6 GiB, less than the trainer's 17.7 GiB" in msg
    # colocated, the same fraction works: the two take turns on the GPU
    validate_cluster(lampo_7b(monkeypatch, "rollout.sglang_mem_fraction=0.9"), world_size=8, gpu_memory=H100)
    # and a remote SGLang server (rollout.sglang_urls) does not share this GPU
    validate_cluster(lampo_7b(monkeypatch, "rollout.colocate=false", "rollout.sglang_mem_fraction=0.9",
                              "rollout.sglang_urls=[http://rollout:30000]"), world_size=8, gpu_memory=H100)


@pytest.mark.parametrize("config", [None, ROOT / "configs" / "tiny.yaml"])
def test_the_tiny_configs_pass(monkeypatch, config):
    monkeypatch.setenv("WORLD_SIZE", "1")
    shape = validate_cluster(load_config(config), world_size=1, gpu_memory=None)
    assert shape.context == 256


def test_the_runner_refuses_before_any_stage(tmp_path):
    from pipeline.runner import run

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"data.max_prompt_tokens=192 \+ rollout.max_new_tokens=100 = 292 tokens "
                                          r"exceed the 256-token context of model.path='tiny'"):
        run(None, [f"run.dir={run_dir}", "rollout.max_new_tokens=100"])
    assert not run_dir.exists()


@pytest.mark.parametrize("extra, expected", [
    ({}, 4096),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 8192),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}, 4096),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 4096),
])
def test_context_length_follows_sglang(extra, expected):
    from types import SimpleNamespace

    assert context_length(SimpleNamespace(max_position_embeddings=4096, **extra))[0] == expected


def test_a_model_the_megatron_backend_cannot_map_is_refused(monkeypatch, tmp_path):
    import json

    c = json.loads((QWEN_MATH_7B / "config.json").read_text())
    c.update(use_sliding_window=True, sliding_window=1024)
    (tmp_path / "config.json").write_text(json.dumps(c))
    cfg = lampo_7b(monkeypatch)
    cfg.model.path = str(tmp_path)
    msg = refusal(cfg, world_size=8, gpu_memory=None)
    assert "backend.name=megatron" in msg and "sliding-window attention (sliding_window=1024)" in msg


def test_rollout_tensor_parallel_must_divide_the_heads(monkeypatch):
    cfg = lampo_7b(monkeypatch)
    cfg.rollout.tensor_parallel = 3  # SGLang engines of 3 GPUs (the field is read where the config has it)
    msg = refusal(cfg, world_size=8, gpu_memory=None)
    assert "rollout.tensor_parallel=3 must divide the 28 attention heads" in msg and "world size 8" in msg
    cfg.rollout.tensor_parallel, cfg.rollout.sglang_mem_fraction = 4, 0.15  # 14.2 GiB of weights: 3.5 GiB per GPU
    validate_cluster(cfg, world_size=8, gpu_memory=H100)
