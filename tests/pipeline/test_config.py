"""The config tree: YAML + dotted overrides, validation messages that name the field, and config diffs."""
from __future__ import annotations

import pytest

from pipeline.config import Config, ConfigError, apply_overrides, config_diff, load_config, resolve_key


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.rl.algorithm.advantage == "lampo"


def test_lampo_weight_defaults_to_confidence_and_accepts_preference():
    assert load_config(None).rl.algorithm.lampo_weight == "confidence"
    assert load_config(None, ["rl.algorithm.lampo_weight=preference"]).rl.algorithm.lampo_weight == "preference"


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  iterations: 7\n  algorithm:\n    clip_high: 0.3\n")
    cfg = load_config(f, ["rl.lr=5e-5", "backend.tensor_parallel=1", "backend=torch", "eval.benchmarks=tiny,math500",
                          "rl.algorithm.dual_clip=3.0", "rl.reward.dense=null"])
    assert cfg.rl.iterations == 7 and cfg.rl.algorithm.clip_high == 0.3
    assert cfg.rl.lr == 5e-5 and cfg.backend.name == "torch"
    assert cfg.eval.benchmarks == ["tiny", "math500"]
    assert cfg.rl.algorithm.dual_clip == 3.0 and cfg.rl.reward.dense is None


def test_bare_leaf_and_section_keys_resolve():
    assert resolve_key("pipeline_parallel") == "backend.pipeline_parallel"
    assert resolve_key("backend") == "backend.name"
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_key("lr")  # sft.lr and rl.lr
    with pytest.raises(ConfigError, match="write one of: backend.tensor_parallel, rollout.tensor_parallel"):
        resolve_key("tensor_parallel")
    with pytest.raises(ConfigError, match="did you mean"):
        resolve_key("rl.iteratons")


@pytest.mark.parametrize("override, fragment", [
    (["rl.iterations=0"], "rl.iterations=0 must be at least 1"),
    (["rollout.n_samples=1"], "at least 2 samples"),
    (["sft.lr=abc"], "sft.lr: expected a number"),
    (["run.stages=[sft,sft]"], "run.stages=['sft', 'sft'] names a stage twice"),
    (["model.dtype=int8"], "model.dtype='int8' is not one of 'float32', 'bfloat16', 'float16'"),
    (["rl.algorithm.clip_low=1.5"], "clip_low=1.5 must be below 1"),
    (["backend.adam_beta2=1.0"], "backend.adam_beta2=1.0 must be in [0, 1)"),
    (["rollout.sglang_mem_fraction=1.0"], "rollout.sglang_mem_fraction=1.0 must be in (0, 1)"),
    (["rollout.sglang_mem_fraction=0"], "rollout.sglang_mem_fraction=0.0 must be in (0, 1)"),
    (["rl.min_lr_ratio=1.5"], "rl.min_lr_ratio=1.5 must be in [0, 1]"),
    (["sft.min_lr_ratio=-0.1"], "sft.min_lr_ratio=-0.1 must be in [0, 1]"),
    (["rl.warmup_steps=-1"], "rl.warmup_steps=-1 must be >= 0"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)


# Names are checked against the live registries (and the backend's own layout rules applied) by
# pipeline.validate.validate_names, which every entry point calls after load_config: the schema module imports no other
# module of the project. The messages are the one-liners load_config gave when it checked them itself.
@pytest.mark.parametrize("override, message", [
    (["rl.algorithm.advantage=ppo"], "rl.algorithm.advantage='ppo' is not one of 'dr_grpo', 'grpo', 'lampo', 'rloo'"),
    (["rl.algorithm.lampo_weight=bogus"],
     "rl.algorithm.lampo_weight='bogus' is not one of 'confidence', 'preference'"),
    (["rl.algorithm.policy_loss=x"], "rl.algorithm.policy_loss='x' is not one of 'gspo', 'ppo_clip'"),
    (["rl.algorithm.loss_agg=x"], "rl.algorithm.loss_agg='x' is not one of 'seq-mean-token-mean', "
                                  "'seq-mean-token-sum', 'seq-sum-constant', 'token-mean'"),
    (["rl.algorithm.kl_estimator=k4"], "rl.algorithm.kl_estimator='k4' is not one of 'k1', 'k2', 'k3'"),
    (["rl.reward.outcome=x"], "rl.reward.outcome='x' is not one of 'choice', 'math', 'rouge_l', 'semantic_density'"),
    (["rl.reward.dense=x"], "rl.reward.dense='x' is not one of 'choice', 'math', 'rouge_l', 'semantic_density'"),
    (["backend.name=jax"], "backend.name='jax' is not one of 'deepspeed', 'megatron', 'torch'"),
    (["rollout.engine=vllm"], "rollout.engine='vllm' is not one of 'hf', 'sglang'"),
    (["run.stages=[sft,train]"], "run.stages[]='train' is not one of 'sft', 'rl', 'rollout', 'evaluate'"),
    (["backend=deepspeed", "backend.tensor_parallel=2"],
     "backend.tensor_parallel=2, pipeline_parallel=1: the deepspeed backend is data-parallel only (ZeRO); set both to "
     "1 or use backend=megatron for tensor/pipeline parallelism"),
])
def test_bad_names_are_refused_by_validate_names(override, message):
    from pipeline.validate import validate_names

    cfg = load_config(None, override)  # the schema's own checks pass: these are values of the right type
    with pytest.raises(ConfigError) as e:
        validate_names(cfg)
    assert str(e.value) == message


def test_validate_names_passes_every_shipped_config_and_returns_it(monkeypatch):
    from pathlib import Path

    from pipeline.validate import validate_names

    monkeypatch.setenv("WORLD_SIZE", "8")  # the GPU configs' layouts are for a node of 8 (the tiny ones run on any)
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for f in configs:
        cfg = load_config(f)
        assert validate_names(cfg) is cfg, f


def test_unknown_yaml_field_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  iteratons: 3\n")
    with pytest.raises(ConfigError, match="unknown config field 'rl.iteratons'; did you mean 'iterations'"):
        load_config(f)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/c.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["rl.iterations"])


def test_config_diff_lists_changed_leaves():
    a, b = Config().to_dict(), load_config(None, ["rl.lr=1e-3"]).to_dict()
    assert config_diff(a, b) == [f"rl.lr: {a['rl']['lr']!r} -> 0.001"]


def test_training_data_errors_name_file_line_and_field(tmp_path):
    from pipeline.checks import PipelineError
    from pipeline.data import map_rows, read_records

    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(PipelineError, match=r"d.jsonl:1: missing field 'problem'.*has \['answer', 'question'\]"):
        map_rows(read_records(str(f)), load_config(None).data)
    rows = map_rows(read_records(str(f)), load_config(None, ["data.prompt_field=question"]).data)
    assert rows == [{"id": f"{f}:1", "problem": "1+1?", "answer": "2", "solution": ""}]
    with pytest.raises(PipelineError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))



def test_answer_after_takes_gsm8ks_final_answer_from_its_worked_solution(tmp_path):
    """GSM8K's hub rows hold a worked solution ending '#### N' in ``answer``: with data.answer_after='####' the answer
    is N and the whole field stays the reference solution (rows of the real test set, in the hub's field names)."""
    import json
    import os
    from pathlib import Path

    from pipeline.checks import PipelineError
    from pipeline.data import map_rows, read_records

    shared = Path(os.environ.get("LAMPO_SHARED_DATA", Path(__file__).resolve().parents[2] / "../shared/data"))
    if not (shared / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"GSM8K test rows not found in {shared}")
    real = [json.loads(line) for line in (shared / "gsm8k_test.jsonl").read_text().splitlines()[:200]]
    f = tmp_path / "gsm8k_hub_format.jsonl"
    f.write_text("".join(json.dumps({"question": r["problem"], "answer": r["solution"]}) + "\n" for r in real))
    cfg = load_config(None, ["data.prompt_field=question", "data.answer_field=answer", "data.solution_field=answer",
                             "data.answer_after='####'"])  # quoted: a bare # starts a YAML comment
    rows = map_rows(read_records(str(f)), cfg.data)
    assert [r["answer"] for r in rows] == [r["answer"] for r in real]  # e.g. "2,125": the reward normalises commas
    assert [r["solution"] for r in rows] == [r["solution"] for r in real]
    f.write_text(json.dumps({"question": "q", "answer": "no marker here"}) + "\n")
    with pytest.raises(PipelineError, match=r"gsm8k_hub_format.jsonl:1: field 'answer' has no answer after '####'"):
        map_rows(read_records(str(f)), cfg.data)

# --- the collective timeout reaches every process-group init ---------------------------------------------------------

def test_collective_timeout_default_is_hours():
    from pathlib import Path

    assert load_config(None).run.collective_timeout_min >= 180  # NCCL's own default (10 minutes) kills rank-0 phases
    lampo_7b = Path(__file__).resolve().parents[2] / "configs" / "lampo_7b.yaml"
    assert load_config(lampo_7b, ["backend=torch", "backend.tensor_parallel=1"]).run.collective_timeout_min >= 180
    with pytest.raises(ConfigError, match="run.collective_timeout_min=0 must be at least 1"):
        load_config(None, ["run.collective_timeout_min=0"])


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


@pytest.fixture
def fake_group(monkeypatch):
    """torch.distributed with no group yet, whose init_process_group only records its arguments."""
    import torch.distributed as tdist

    from pipeline import dist

    rec = _Recorder()
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", rec)
    monkeypatch.setattr(dist, "_timeout", None, raising=False)  # restored after the test
    return rec


def test_dist_init_passes_the_timeout_to_the_default_group(fake_group, monkeypatch):
    from datetime import timedelta

    import torch

    from pipeline import dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dist.init(420)
    ((args, kwargs),) = fake_group.calls  # the one process-group init, as the backends' (torchrun's env:// group)
    assert args == ("gloo",) and kwargs["timeout"] == timedelta(minutes=420) and kwargs["init_method"] == "env://"
    assert dist.collective_timeout() == timedelta(minutes=420) and dist.collective_timeout_minutes() == 420


def test_dist_init_in_one_process_records_the_timeout_without_a_group(fake_group, monkeypatch):
    from datetime import timedelta

    from pipeline import dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.collective_timeout() == timedelta(minutes=load_config(None).run.collective_timeout_min)
    dist.init(90)
    assert fake_group.calls == [] and dist.collective_timeout() == timedelta(minutes=90)


def test_runner_loads_the_config_before_init_and_passes_its_timeout(monkeypatch):
    from pipeline import runner

    seen = []

    class Stop(Exception):
        pass

    def fake_init(timeout_min=None):
        seen.append(timeout_min)
        raise Stop

    monkeypatch.setattr(runner.dist, "init", fake_init)
    with pytest.raises(Stop):
        runner.run(None, ["run.collective_timeout_min=500"])
    assert seen == [500]


def test_megatron_groups_get_the_timeout(fake_group, monkeypatch):
    from datetime import timedelta

    import torch
    import torch.distributed as tdist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from pipeline import dist
    from pipeline.backends.megatron_backend.parallel import Layout, init_parallel

    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init(400)
    megatron = _Recorder()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: None)
    monkeypatch.setattr(tdist, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(ps, "initialize_model_parallel", megatron)
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda *a, **k: None)
    init_parallel(Layout(1, 1, 1), seed=0, use_cuda=True)  # CUDA path: NCCL, no cpu_compat patching
    ((args, kwargs),) = fake_group.calls
    assert args == ("nccl",) and kwargs["timeout"] == timedelta(minutes=400)
    ((_, kwargs),) = megatron.calls
    assert kwargs["distributed_timeout_minutes"] == 400


@pytest.mark.parametrize("torchrun", [True, False])
def test_a_backends_group_gets_the_timeout(fake_group, monkeypatch, torchrun):
    from datetime import timedelta

    from pipeline import dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init(300)
    if torchrun:
        monkeypatch.setenv("RANK", "0")
    else:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group(use_cuda=False)  # what every backend calls (the deepspeed one included)
    ((_, kwargs),) = fake_group.calls
    assert kwargs["timeout"] == timedelta(minutes=300)


# --- renamed fields: backend.colocate_rollout is now rollout.colocate -------------------------------------------------
def test_the_old_colocate_name_in_a_yaml_file_is_read_as_the_new_one(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("backend:\n  name: torch\n  colocate_rollout: false\n")
    with pytest.warns(FutureWarning, match=r"backend.colocate_rollout is deprecated: it is now rollout.colocate "
                                           r"\(read as rollout.colocate=False\)"):
        cfg = load_config(f)
    assert cfg.rollout.colocate is False and not hasattr(cfg.backend, "colocate_rollout")
    assert load_config(None).rollout.colocate is True  # the default is unchanged


@pytest.mark.parametrize("key", ["backend.colocate_rollout", "colocate_rollout"])
def test_the_old_colocate_name_works_as_an_override(key):
    with pytest.warns(FutureWarning, match="it is now rollout.colocate"):
        assert load_config(None, [f"{key}=false"]).rollout.colocate is False


def test_a_wrong_colocate_value_and_a_conflict_are_refused_clearly(tmp_path):
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="rollout.colocate: expected true or false, "
                                                                        "got 'maybe'"):
        load_config(None, ["backend.colocate_rollout=maybe"])
    f = tmp_path / "both.yaml"
    f.write_text("backend:\n  colocate_rollout: false\nrollout:\n  colocate: true\n")
    with pytest.raises(ConfigError, match="backend.colocate_rollout .* is False but rollout.colocate is True; set "
                                          "rollout.colocate only"):
        load_config(f)


def test_a_saved_run_with_the_old_colocate_name_resumes(tmp_path):
    """A run folder whose config.yaml predates the rename is the same config (no 'different config' refusal)."""
    import yaml

    from pipeline.runner import check_same_config
    from pipeline.state import RunDir

    cfg = load_config(None, ["rollout.colocate=false"])
    old = cfg.to_dict()
    old["backend"]["colocate_rollout"] = old["rollout"].pop("colocate")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with pytest.warns(FutureWarning):
        check_same_config(RunDir(tmp_path), cfg, force=False)
        with pytest.raises(Exception, match="rollout.colocate: False -> True"):  # a real change is still seen
            check_same_config(RunDir(tmp_path), load_config(None), force=False)
