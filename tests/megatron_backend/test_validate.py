"""Layouts the model or the world cannot take are refused at config time, with the numbers in the message."""
from __future__ import annotations

import pytest

from pipeline.backends.megatron_backend.backend import MegatronBackend
from pipeline.config import Config, ConfigError


def _cfg(tp: int, pp: int) -> Config:
    cfg = Config()  # tiny model: 4 heads, 2 kv heads, 4 layers
    cfg.backend.name, cfg.backend.tensor_parallel, cfg.backend.pipeline_parallel = "megatron", tp, pp
    return cfg


@pytest.mark.parametrize("tp,pp,world,words", [
    (3, 1, 3, ["tensor_parallel=3", "4 attention heads"]),
    (4, 1, 4, ["tensor_parallel=4", "2 key/value heads"]),
    (1, 3, 3, ["pipeline_parallel=3", "4 layers"]),
    (2, 1, 3, ["world size 3", "2 x 1"]),
    (2, 2, 2, ["world size 2", "2 x 2"]),
])
def test_bad_layout_is_refused(monkeypatch, tp, pp, world, words):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        MegatronBackend.validate_config(_cfg(tp, pp))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4), (2, 1, 4), (1, 4, 8)])
def test_good_layout_passes(monkeypatch, tp, pp, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    MegatronBackend.validate_config(_cfg(tp, pp))


def test_validate_names_runs_the_backend_check(monkeypatch):
    """The backend's own layout check runs with the registry checks (``pipeline.validate.validate_names``, which every
    entry point calls after ``load_config``; the schema module imports no backend)."""
    from pipeline.config import load_config
    from pipeline.validate import validate_names

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["backend=megatron", "pipeline_parallel=3", "backend.tensor_parallel=1"])
    with pytest.raises(ConfigError, match="pipeline_parallel=3"):
        validate_names(cfg)


def test_unmapped_model_family_is_refused_at_config_time(tmp_path, monkeypatch):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_attention_heads": 4,
                                                      "num_hidden_layers": 2}))
    cfg = _cfg(1, 1)
    cfg.model.path = str(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="'gpt2' model"):
        MegatronBackend.validate_config(cfg)
