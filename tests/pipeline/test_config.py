"""The config tree: YAML + dotted overrides, validation messages that name the field, and config diffs."""
from __future__ import annotations

import pytest

from pipeline.config import Config, ConfigError, apply_overrides, config_diff, load_config, resolve_key


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.rl.algorithm.advantage == "lampo"


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  iterations: 7\n  algorithm:\n    clip_high: 0.3\n")
    cfg = load_config(f, ["rl.lr=5e-5", "tensor_parallel=1", "backend=torch", "eval.benchmarks=tiny,math500",
                          "rl.algorithm.dual_clip=3.0", "rl.reward.dense=null"])
    assert cfg.rl.iterations == 7 and cfg.rl.algorithm.clip_high == 0.3
    assert cfg.rl.lr == 5e-5 and cfg.backend.name == "torch"
    assert cfg.eval.benchmarks == ["tiny", "math500"]
    assert cfg.rl.algorithm.dual_clip == 3.0 and cfg.rl.reward.dense is None


def test_bare_leaf_and_section_keys_resolve():
    assert resolve_key("tensor_parallel") == "backend.tensor_parallel"
    assert resolve_key("backend") == "backend.name"
    with pytest.raises(ConfigError, match="ambiguous"):
        resolve_key("lr")  # sft.lr and rl.lr
    with pytest.raises(ConfigError, match="did you mean"):
        resolve_key("rl.iteratons")


@pytest.mark.parametrize("override, fragment", [
    (["rl.iterations=0"], "rl.iterations=0 must be at least 1"),
    (["rl.algorithm.advantage=ppo"], "rl.algorithm.advantage='ppo' is not one of"),
    (["backend.name=jax"], "backend.name='jax' is not one of"),
    (["rl.algorithm.kl_estimator=k4"], "kl_estimator"),
    (["rollout.n_samples=1"], "at least 2 samples"),
    (["sft.lr=abc"], "sft.lr: expected a number"),
    (["run.stages=[sft,train]"], "run.stages[]='train'"),
    (["rl.algorithm.clip_low=1.5"], "clip_low=1.5 must be below 1"),
    (["backend.adam_beta2=1.0"], "backend.adam_beta2=1.0 must be in [0, 1)"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert fragment in str(e.value)


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
