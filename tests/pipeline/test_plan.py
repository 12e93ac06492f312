"""The launch planner (``python -m pipeline plan``): analytic parameter counts against models built on the meta device
and against the published figures, the memory formulas, every shipped launcher config on one 8x80 GiB node, the
refusals (layout, memory), and ``DRY_RUN=1`` of every training script."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.plan import (
    GIB,
    MODEL_CONFIGS,
    RESERVE_GIB,
    Cluster,
    Shape,
    count_parameters,
    load_for_plan,
    make_plan,
    plan_config,
    read_model_config,
    shipped_config_dir,
)
from pipeline.runner import main

ROOT = Path(__file__).resolve().parents[2]
NODE = Cluster(nodes=1, gpus_per_node=8, gpu_memory_gib=80)
SHIPPED = ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-Math-7B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B",
           "microsoft/Phi-4-mini-instruct"]
LAUNCHERS = {  # training script -> its config
    "run_lampo_7b.sh": "configs/lampo_7b.yaml",
    "run_lampo_qwen3_1.7b.sh": "configs/qwen3_1.7b.yaml",
    "run_lampo_qwen3_4b.sh": "configs/qwen3_4b.yaml",
    "run_lampo_phi4_mini.sh": "configs/phi4_mini.yaml",
    "run_lampo_tiny.sh": "configs/tiny.yaml",
}


def shipped(model_id: str) -> dict:
    return json.loads((shipped_config_dir(model_id) / "config.json").read_text())


# --- parameter counts -------------------------------------------------------------------------------------------------


def meta_count(model_id: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(shipped_config_dir(model_id)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied matrix is yielded once


@pytest.mark.parametrize("model_id", SHIPPED)
def test_param_count_equals_model_built_on_meta_device(model_id):
    # exact, so a missing Q/K/V bias (Qwen2: 5120 per layer) or q/k norm (Qwen3: 256 per layer) fails too; the brief's
    # 0.5% tolerance is implied
    counted = count_parameters(Shape.from_config(shipped(model_id))).total
    assert counted == meta_count(model_id)


def test_param_count_of_the_tiny_model():
    from pipeline.config import TinyModelConfig
    from pipeline.tiny.model import build_tiny_model
    from pipeline.tiny.tokenizer import build_tokenizer

    model_config, _ = read_model_config("tiny", tiny=TinyModelConfig())
    model = build_tiny_model(TinyModelConfig(), build_tokenizer(), seed=0)
    assert count_parameters(Shape.from_config(model_config)).total == sum(p.numel() for p in model.parameters())


# Published figures (model cards on huggingface.co; "stored" = the hub's safetensors parameter count):
#   Qwen/Qwen2.5-7B card: "Number of Parameters: 7.61B", non-embedding 6.53B (untied embedding and output layer);
#   Qwen/Qwen3-1.7B card: "Number of Parameters: 1.7B", non-embedding 1.4B; the hub lists 2.03B because its checkpoint
#     also stores lm_head.weight, the tied copy of the embedding: 1.721B distinct + 0.311B = 2.032B;
#   Qwen/Qwen3-4B card: "Number of Parameters: 4.0B", non-embedding 3.6B; the hub lists 4.02B (tied embedding once);
#   microsoft/Phi-4-mini-instruct card: "3.8B parameters"; the hub lists 3.84B (tied embedding once).
PUBLISHED = [  # (model, which count, published total, published non-embedding or None)
    ("Qwen/Qwen2.5-7B", "total", 7.61e9, 6.53e9),
    ("Qwen/Qwen3-1.7B", "total", 1.7e9, 1.4e9),
    ("Qwen/Qwen3-1.7B", "stored", 2.03e9, None),
    ("Qwen/Qwen3-4B", "total", 4.02e9, 3.6e9),
    ("microsoft/Phi-4-mini-instruct", "total", 3.84e9, None),
]


@pytest.mark.parametrize("model_id,which,total,non_embedding", PUBLISHED)
def test_param_count_matches_published_figure(model_id, which, total, non_embedding):
    pc = count_parameters(Shape.from_config(shipped(model_id)))
    assert abs(getattr(pc, which) - total) / total < 0.02
    if non_embedding is not None:
        assert abs(pc.total - pc.embedding - pc.lm_head - non_embedding) / non_embedding < 0.02


def test_shipped_configs_are_read_without_the_hub(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("AutoConfig.from_pretrained was called for a model with a shipped config")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for model_id in SHIPPED:
        config, source = read_model_config(model_id)
        assert config["model_type"] in ("qwen2", "qwen3", "phi3") and "shipped" in source
    assert sorted(p.name for p in MODEL_CONFIGS.iterdir() if (p / "config.json").is_file()) == sorted(
        m.replace("/", "--") for m in SHIPPED)


def test_local_checkpoint_folder_is_read_from_its_config_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(shipped("Qwen/Qwen3-4B")))
    assert main(["plan", "configs/qwen3_4b.yaml", f"model.path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert f"config: {tmp_path / 'config.json'}" in out and "4.022 B parameters" in out


def test_unreachable_hub_config_is_one_line_exit_2(monkeypatch, capsys):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    assert main(["plan", "configs/qwen3_4b.yaml", "model.path=some-org/unknown-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "some-org/unknown-model" in err and "no connection" in err


# --- memory formulas --------------------------------------------------------------------------------------------------


def test_megatron_state_per_gpu_follows_the_docstring_formula():
    cfg, model_config, _ = load_for_plan("configs/lampo_7b.yaml", [], 8)  # TP 4 x PP 1 x DP 2, bf16, dist. optimizer
    plan = make_plan(cfg, NODE, model_config)
    s = Shape.from_config(model_config)
    pc = count_parameters(s)
    v_pad = -(-s.vocab_size // 4) * 4
    layers = s.num_layers * (pc.per_layer_tp // 4 + pc.per_layer_replicated)
    p_gpu = layers + 2 * v_pad * s.hidden_size // 4 + s.hidden_size  # + embedding and output layer /TP, final norm
    # bf16 weights 2 + fp32 masters 4 + fp32 grads 4, AdamW moments 8 / DP=2
    assert plan.figures["train_static_gib"] * GIB == pytest.approx((2 + 4 + 4 + 8 / 2) * p_gpu)
    without = make_plan(load_for_plan("configs/lampo_7b.yaml", ["backend.distributed_optimizer=false"], 8)[0], NODE,
                        model_config)
    assert without.figures["train_static_gib"] * GIB == pytest.approx((2 + 4 + 4 + 8) * p_gpu)


@pytest.mark.parametrize("stage,offload,per_param", [
    (0, False, lambda dp: 2 + 2 + 12), (1, False, lambda dp: 2 + 2 + 12 / dp), (2, False, lambda dp: 2 + (2 + 12) / dp),
    (3, False, lambda dp: (2 + 2 + 12) / dp), (2, True, lambda dp: 2 + 2 / dp)])
def test_deepspeed_state_per_gpu_follows_zero_stage(stage, offload, per_param):
    over = [f"backend.zero_stage={stage}", f"backend.offload_optimizer={str(offload).lower()}"]
    cfg, model_config, _ = load_for_plan("configs/phi4_mini.yaml", over, 8)
    plan = make_plan(cfg, NODE, model_config)
    pc = count_parameters(Shape.from_config(model_config))
    gathered = 2 * pc.per_layer if stage == 3 else 0  # ZeRO-3 also holds the layer it is gathering
    assert plan.figures["train_static_gib"] * GIB == pytest.approx(per_param(8) * pc.total + gathered)


def test_activations_recompute_and_kv_cache_formulas():
    cfg, model_config, _ = load_for_plan("configs/phi4_mini.yaml", [], 8)  # deepspeed: TP 1, micro-batch 2 x 4096
    s = Shape.from_config(model_config)
    plan = make_plan(cfg, NODE, model_config)
    tokens = 2 * (1024 + 3072)
    layer = tokens * 2 * (4 * s.hidden_size + 3 * s.num_heads * s.head_dim + 3 * s.num_kv_heads * s.head_dim
                          + 4 * s.intermediate_size)
    assert plan.figures["train_act_no_recompute_gib"] * GIB == pytest.approx(s.num_layers * layer)
    assert plan.figures["train_act_gib"] * GIB == pytest.approx(s.num_layers * tokens * 2 * s.hidden_size + layer)
    assert plan.figures["logits_gib"] * GIB == pytest.approx(tokens * s.vocab_size * (2 + 4 + 4))
    # SGLang: 0.5 x (80 GiB - the trainer's bf16 weights and fp32 master partitions) for weights + KV cache
    pc = count_parameters(s)
    share = 0.5 * (80 * GIB - (2 * pc.total + 4 * pc.total / 8))
    kv_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2
    assert plan.figures["concurrent_sequences"] == (share - 2 * pc.total) // (kv_token * 4096)
    assert plan.figures["tokens_per_iteration"] == 128 * 8 * 4096


# --- the launchers' configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [c for c in LAUNCHERS.values() if c != "configs/tiny.yaml"])
def test_every_launcher_config_fits_one_node_of_8x80gib(config):
    plan = plan_config(config, [], NODE)
    assert plan.problems == [], plan.problems
    assert plan.figures["train_peak_gib"] <= 80 and plan.figures["rollout_gpu_gib"] <= 80
    assert plan.figures["concurrent_sequences"] >= 1


@pytest.mark.parametrize("config", ["configs/qwen3_1.7b.yaml", "configs/qwen3_4b.yaml", "configs/phi4_mini.yaml"])
def test_paper_model_configs_train_on_a_hub_math_set_and_evaluate_on_the_paper_benchmarks(config):
    cfg, model_config, _ = load_for_plan(config, [], 8)
    assert cfg.data.train == "agentica-org/DeepScaleR-Preview-Dataset"
    assert (cfg.data.prompt_field, cfg.data.answer_field, cfg.data.solution_field) == ("problem", "answer", "solution")
    assert cfg.data.heldout == "HuggingFaceH4/MATH-500"
    assert cfg.eval.benchmarks == ["math500", "aime24", "aime25", "gpqa_diamond"]
    context = model_config["max_position_embeddings"]
    assert cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens) <= context


def test_phi4_mini_is_refused_by_megatron_for_its_partial_rotary():
    cfg, model_config, _ = load_for_plan("configs/phi4_mini.yaml", ["backend=megatron"], 8)
    plan = make_plan(cfg, NODE, model_config)
    assert any("partial_rotary_factor=0.75" in p for p in plan.problems)


# --- refusals on the command line -------------------------------------------------------------------------------------


def test_tp3_on_qwen25_7b_is_refused_naming_heads(capsys):
    assert main(["plan", "configs/lampo_7b.yaml", "backend.tensor_parallel=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tensor_parallel=3 does not divide 28 attention heads" in err
    assert "does not divide 4 key/value heads" in err


def test_bad_names_are_refused_by_the_plan(capsys):
    assert main(["plan", "configs/qwen3_4b.yaml", "rollout.engine=vllm"]) == 2
    assert capsys.readouterr().err.strip() == "error: rollout.engine='vllm' is not one of 'hf', 'sglang'"


def test_pp_that_does_not_divide_layers_is_refused(capsys):
    assert main(["plan", "configs/qwen3_4b.yaml", "backend.tensor_parallel=1", "backend.pipeline_parallel=4"]) == 0
    capsys.readouterr()
    assert main(["plan", "configs/qwen3_4b.yaml", "backend.tensor_parallel=1", "backend.pipeline_parallel=5"]) == 2
    assert "pipeline_parallel=5 does not divide 36 layers" in capsys.readouterr().err


def test_layout_that_does_not_fit_memory_is_refused_naming_gib(capsys):
    assert main(["plan", "configs/phi4_mini.yaml", "backend.micro_batch_size=16"]) == 2
    out, err = capsys.readouterr()
    assert "training peak" in out
    assert len(err.strip().splitlines()) == 1
    m = re.search(r"training needs ([\d.]+) GiB per GPU \(([\d.]+) state \+ ([\d.]+) activations \+ ([\d.]+) logits "
                  r"\+ ([\d.]+) reserve\) but a GPU has 80 GiB", err)
    assert m, err
    total, *parts = map(float, m.groups())
    assert total > 80 and total == pytest.approx(sum(parts), abs=0.2) and parts[-1] == RESERVE_GIB
    # the same config on a GPU with enough memory passes
    assert main(["plan", "configs/phi4_mini.yaml", "backend.micro_batch_size=16", "--gpu-memory-gib", "200"]) == 0


def test_rollout_share_too_small_for_the_weights_is_refused(capsys):
    assert main(["plan", "configs/lampo_7b.yaml", "rollout.sglang_mem_fraction=0.15"]) == 2
    err = capsys.readouterr().err
    assert "14.2 GiB of weights per GPU do not fit SGLang's share" in err


def test_context_overflow_is_refused(capsys):
    assert main(["plan", "configs/qwen3_4b.yaml", "rollout.max_new_tokens=40000"]) == 2
    assert "41024 tokens exceed the 40960-token context" in capsys.readouterr().err


# --- DRY_RUN of the training scripts ----------------------------------------------------------------------------------


def dry_run(script: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "DRY_RUN": "1", **env,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # python3 = this one
    for name in ("TP", "PP", "NPROC", "NNODES", "GPU_MEM_GIB"):
        if name not in env:
            full.pop(name, None)
    return subprocess.run(["bash", str(ROOT / "training_scripts" / script)], env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", sorted(LAUNCHERS))
def test_dry_run_of_every_training_script_prints_the_plan(script):
    r = dry_run(script)
    assert r.returncode == 0, r.stderr
    config = LAUNCHERS[script]
    assert "training" in r.stdout and "the layout divides and fits" in r.stdout
    if script != "run_lampo_tiny.sh":
        cfg = load_for_plan(config, [], 8)[0]
        b = cfg.backend
        tp, pp = (b.tensor_parallel, b.pipeline_parallel) if b.name == "megatron" else (1, 1)
        assert f"TP {tp} x PP {pp} x DP {8 // (tp * pp)} = 8 processes" in r.stdout  # the YAML's layout
        assert "world 8" in r.stdout


def test_dry_run_passes_tp_and_pp_only_when_set():
    r = dry_run("run_lampo_7b.sh", TP="2", PP="2")
    assert r.returncode == 0, r.stderr
    assert "TP 2 x PP 2 x DP 2 = 8 processes" in r.stdout
    r = dry_run("run_lampo_7b.sh", TP="3")
    assert r.returncode == 2
    assert "tensor_parallel=3 does not divide 28 attention heads" in r.stderr
    assert "4 key/value heads" in r.stderr
