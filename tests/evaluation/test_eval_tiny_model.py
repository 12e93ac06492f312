"""A real (tiny, random) Qwen2 model evaluated end to end through the HF rollout engine, in-process and by the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluation.__main__ import main
from evaluation.run import evaluate
from pipeline.config import Config, TinyModelConfig
from pipeline.rollout import engine_class
from pipeline.tiny import build_tokenizer, create_tiny_checkpoint

SMALL = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return create_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", SMALL, seed=0)


def hf_engine(path: Path):
    torch.set_num_threads(1)
    return engine_class("hf")(str(path), build_tokenizer(), Config())


def test_tiny_model_evaluates_end_to_end_and_reproducibly(tiny_ckpt: Path, tmp_path: Path, shared_data: Path) -> None:
    eng, tok = hf_engine(tiny_ckpt), build_tokenizer()
    kw = dict(samples=2, temperature=1.0, top_p=0.95, max_new_tokens=12, data_dir=shared_data, limit=3,
              batch_size=2, progress=False, model_id=str(tiny_ckpt))
    res = evaluate(eng, tok, ["tiny", "aime24"], out_dir=tmp_path / "a", **kw)
    for name in ("tiny", "aime24"):
        r = res["benchmarks"][name]
        assert r["n_problems"] == 3 and r["samples"] == 2
        assert all(0.0 <= r["metrics"][m] <= 1.0 for m in ("avg@2", "pass@1", "pass@2", "maj@2"))
        assert r["metrics"]["pass@2"] >= r["metrics"]["pass@1"] == pytest.approx(r["metrics"]["avg@2"])
        assert 1 <= r["length"]["mean"] <= 12 and r["length"]["max"] <= 12
        recs = [json.loads(x) for x in (tmp_path / "a" / name / "responses.jsonl").read_text().splitlines()]
        assert len(recs) == 6 and all(isinstance(x["response"], str) for x in recs)
    # the tiny task's prompt reached the model as its raw text
    first = json.loads((tmp_path / "a" / "tiny" / "responses.jsonl").read_text().splitlines()[0])
    assert first["prompt"] == "What is 4+7-4-7?"
    # per-batch seeds make a second run in a fresh folder sample exactly the same responses
    evaluate(eng, tok, ["tiny", "aime24"], out_dir=tmp_path / "b", **kw)
    for name in ("tiny", "aime24"):
        a = (tmp_path / "a" / name / "responses.jsonl").read_text()
        b = (tmp_path / "b" / name / "responses.jsonl").read_text()
        assert a == b


def test_cli_evaluates_a_checkpoint(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    rc = main(["--model", str(tiny_ckpt), "--benchmarks", "tiny", "--limit", "2", "--samples", "2",
               "--temperature", "0.6", "--max-new-tokens", "8", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| tiny | 2 |" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["temperature"] == 0.6 and res["settings"]["model"] == str(tiny_ckpt)
    assert res["benchmarks"]["tiny"]["n_problems"] == 2


def test_cli_reports_bad_input_clearly(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tiny_ckpt), "--benchmarks", "tiny,math5000", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'math5000'; known: aime24" in capsys.readouterr().err
    missing = tmp_path / "none.jsonl"
    assert main(["--model", str(tiny_ckpt), "--benchmarks", f"math500={missing}", "--out", str(tmp_path)]) == 2
    assert f"{missing}' does not exist" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "no_model"), "--benchmarks", "tiny", "--out", str(tmp_path)]) == 2
    assert "no_model" in capsys.readouterr().err
    # the pipeline config given for engine settings is checked like the runner checks it (names included)
    assert main(["--model", str(tiny_ckpt), "--benchmarks", "tiny", "--out", str(tmp_path), "model.dtype=int8"]) == 2
    assert "model.dtype='int8' is not one of" in capsys.readouterr().err
    assert main(["--model", str(tiny_ckpt), "--benchmarks", "tiny", "--out", str(tmp_path),
                 "backend.name=jax"]) == 2
    assert "error: backend.name='jax' is not one of 'deepspeed', 'megatron', 'torch'" in capsys.readouterr().err


def test_cli_defaults_are_the_evaluate_stages_except_where_documented() -> None:
    """``python -m evaluation`` takes its defaults from the config classes the evaluate stage reads; the documented
    differences (evaluation/__main__.py) keep the values the command always had."""
    from evaluation.__main__ import parse_args
    from pipeline.config import EvalConfig, RewardConfig, RolloutConfig

    args = parse_args(["--model", "m", "--benchmarks", "tiny"])
    e = EvalConfig()
    assert (args.samples, args.temperature, args.top_p, args.limit, args.data_dir) == \
        (e.samples, e.temperature, e.top_p, e.limit, e.data_dir)
    assert args.engine == RolloutConfig().engine and args.timeout == RewardConfig().timeout_s
    assert (args.max_new_tokens, args.seed, args.batch_size) == (1024, 0, 32)  # the intentional differences
