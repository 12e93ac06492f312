"""The runner end to end on a very small tiny-pipeline config, as a user runs it (a subprocess per command):
a full run, skipping finished stages, SIGKILL at four points followed by a resume that ends where an uninterrupted
run ends, and the one-line errors for bad input that leave the run folder untouched."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "run.threads=1", "run.progress=false",
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128",
    "sft.steps=12", "sft.checkpoint_every=4", "sft.warmup_steps=2", "sft.batch_size=8",
    "rl.iterations=3", "rl.prompts_per_iteration=4", "rollout.n_samples=4", "rl.mini_batch_size=8",
    "rl.checkpoint_every=1", "rollout.max_new_tokens=24", "rollout.batch_size=16", "backend.micro_batch_size=8",
    "rl.reward.dense=rouge_l", "rl.reward.alpha=0.5", "eval.limit=6", "eval.max_new_tokens=24",
    "data.tiny_train_size=200",
]


def run_cli(run_dir: Path, *extra: str, fault: str | None = None, config: str = "configs/tiny.yaml"):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LAMPO_FAULT", None)
    if fault:
        env["LAMPO_FAULT"] = fault
    cmd = [sys.executable, "-m", "pipeline", "run", config, f"run.dir={run_dir}", *SMALL, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "rl" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli(run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def test_full_run_writes_everything(reference):
    for stage in ("sft", "rl", "evaluate"):
        assert json.loads((reference / "state" / f"{stage}.json").read_text())["status"] == "done"
    assert (reference / "sft" / "final" / "model.safetensors").exists()
    assert (reference / "rl" / "final" / "tokenizer.json").exists()
    assert sorted(p.name for p in (reference / "rl" / "rollouts").iterdir()) == [
        "iter_00001.jsonl", "iter_00002.jsonl", "iter_00003.jsonl"]
    rows = [json.loads(x) for x in (reference / "rl" / "rollouts" / "iter_00001.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {"reward", "advantage", "response_ids", "reward_components"} <= set(rows[0])
    summary = (reference / "eval" / "summary.md").read_text()
    assert "| tiny |" in summary and "sft" in summary and "rl" in summary
    assert any((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(reference.rglob("*.tmp"))


def test_tensorboard_has_the_promised_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("sft/loss", "sft/lr", "rl/reward_mean", "rl/reward_math", "rl/reward_rouge_l", "rl/accuracy",
                "rl/adv_mean", "rl/pairwise_weight_mean", "rl/pg_loss", "rl/entropy", "rl/clip_frac_high",
                "rl/grad_norm", "rl/response_len_mean", "rl/time_rollout", "rl/rollout_tokens_per_s",
                "eval/tiny/avg@1"):
        assert tag in tags, f"{tag} missing from TensorBoard; have {sorted(tags)}"


def test_rerun_skips_finished_stages(reference):
    res = run_cli(reference)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("sft", "rl", "evaluate"):
        assert f"[{stage}] already done, skipping" in res.stdout


# each point is hit after a checkpoint exists (SFT saves at steps 4 and 8, RL after every iteration of 2 updates), so
# the resumed run must continue from a checkpoint, not start the stage over
@pytest.mark.parametrize("fault", ["sft_step:6", "rl_rollout:2", "rl_update:4", "checkpoint_write:3"])
def test_sigkill_then_resume_matches_uninterrupted_run(reference, tmp_path, fault):
    run_dir = tmp_path / "run"
    killed = run_cli(run_dir, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout, resumed.stdout
    ref, got = final_weights(reference), final_weights(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume at {fault}")
    assert (run_dir / "eval" / "summary.md").read_text() == (reference / "eval" / "summary.md").read_text()


def test_changed_config_is_refused_with_the_difference(reference):
    before = (reference / "config.yaml").read_text()
    res = run_cli(reference, "rl.lr=0.5")
    assert res.returncode == 2
    assert "different config" in res.stderr and "rl.lr" in res.stderr
    assert (reference / "config.yaml").read_text() == before



def test_a_run_folder_from_before_a_new_config_field_still_resumes(tmp_path):
    """A field added to the schema after a run started (absent from its config.yaml) is read as its default; a
    changed value is still refused."""
    import yaml

    from pipeline.checks import PipelineError
    from pipeline.config import load_config
    from pipeline.runner import check_same_config
    from pipeline.state import RunDir

    cfg = load_config(ROOT / "configs/tiny.yaml")
    saved = cfg.to_dict()
    del saved["rl"]["algorithm"]["lampo_weight"], saved["data"]["tiny_ops"]  # fields this run's code did not know
    rd = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_config(rd, cfg, force=False)  # no refusal
    changed = load_config(ROOT / "configs/tiny.yaml", ["rl.algorithm.lampo_weight=preference"])
    with pytest.raises(PipelineError, match=r"rl.algorithm.lampo_weight: 'confidence' -> 'preference'"):
        check_same_config(rd, changed, force=False)

def test_from_stage_reruns_that_stage_and_later_only(reference):
    summary = (reference / "eval" / "summary.md").read_text()
    res = run_cli(reference, "--from-stage", "evaluate")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[sft] already done" in res.stdout and "[rl] already done" in res.stdout
    assert "Held-out evaluation" in res.stdout  # evaluated again, from scratch (its old outputs were removed)
    assert (reference / "eval" / "summary.md").read_text() == summary


@pytest.mark.parametrize("extra, fragment", [
    (["model.path=/no/such/model"], "model path '/no/such/model' does not exist"),
    (["rl.algorithm.advantage=nope"], "rl.algorithm.advantage='nope' is not one of"),
])
def test_bad_input_is_one_clear_line(tmp_path, extra, fragment):
    res = run_cli(tmp_path / "run", *extra)
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert err and fragment in err[0], res.stderr[-2000:]


def test_the_runner_checks_names_before_anything_else(monkeypatch):
    """The registry checks left the schema (``load_config`` accepts any string for a name): the runner applies
    ``pipeline.validate.validate_names`` right after loading, before the process group and any stage."""
    from pipeline import runner
    from pipeline.config import ConfigError

    started = []
    monkeypatch.setattr(runner.dist, "init", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigError, match=r"^rl.algorithm.policy_loss='ppo' is not one of 'gspo', 'ppo_clip'$"):
        runner.run(None, ["rl.algorithm.policy_loss=ppo"])
    assert started == []


def test_malformed_data_row_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "What is 1+1?", "answer": "2", "solution": "1+1=2\\n\\\\boxed{2}"}\n{oops\n')
    res = run_cli(tmp_path / "run", f"data.train={data}")
    assert res.returncode == 2
    assert f"{data}:2: not valid JSON" in res.stderr


def test_standalone_rollout_stage_scores_samples_from_the_newest_checkpoint(reference):
    res = run_cli(reference, "run.stages=[rollout]")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rl/final" in res.stdout
    rows = [json.loads(x) for x in (reference / "rollout" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 4  # rl.prompts_per_iteration held-out prompts x rollout.n_samples
    for r in rows:
        parts = r["reward_components"]
        assert r["reward"] == pytest.approx(parts["math"] + 0.5 * parts["rouge_l"])
