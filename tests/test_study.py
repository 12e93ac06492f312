"""The LamPO-vs-GRPO study (benchmarks/study.py, benchmarks/study_report.py): its design rules, its statistics, and a
2-arm x 2-seed study of a cut-down tiny config run end to end, killed and resumed."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from benchmarks import study, study_report
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.yaml")
SMALL = ["sft.steps=10", "rl.iterations=2", "rl.prompts_per_iteration=2", "rollout.n_samples=4",
         "rl.mini_batch_size=8", "backend.micro_batch_size=8", "rollout.max_new_tokens=12", "eval.max_new_tokens=12",
         "rl.checkpoint_every=1", "sft.checkpoint_every=5", "run.progress=false"]
SMALL_FLAGS = ["--eval-limit", "12", "--sample-limit", "6", "--sample-k", "2", "--curve-limit", "6",
               "--curve-every", "1"]


def make(tmp_path, argv):
    return study.build(study.parse_args([TINY, *argv, "--out", str(tmp_path / "s")]))


# --------------------------------------------------------------------------------------------------------------------
# design


def test_every_built_in_arm_is_a_valid_config_that_changes_what_it_says():
    base = load_config(TINY)
    for name, arm in study.ARMS.items():
        cfg = load_config(TINY, list(arm.overrides))  # a misspelt field or value fails here
        for o in arm.overrides:
            key, value = o.split("=", 1)
            got = cfg
            for part in key.split("."):
                got = getattr(got, part)
            assert str(got).lower() == value.lower() or (value == "null" and got is None) or \
                float(got) == float(value), (name, o, got)
    assert base.rl.algorithm.advantage == "lampo"


def test_arm_sets_custom_arms_and_unknown_names(tmp_path):
    arms = study.parse_arms("core,dr_grpo", ["mine=rl.lr=1e-5,rl.algorithm.advantage=grpo"])
    assert list(arms)[:5] == study.ARM_SETS["core"] and "dr_grpo" in arms
    assert arms["mine"].overrides == ("rl.lr=1e-5", "rl.algorithm.advantage=grpo")
    with pytest.raises(study.StudyError, match="unknown arm.*nope"):
        study.parse_arms("lampo,nope", [])
    with pytest.raises(study.StudyError, match="built-in"):
        study.parse_arms("lampo", ["grpo=rl.lr=1"])
    with pytest.raises(study.StudyError, match="arm bad"):
        make(tmp_path, ["--arms", "lampo", "--arm", "bad=rl.algorithm.advantage=nonsense"])


def test_seeds_count_from_the_config_seed_or_an_explicit_list():
    assert study.parse_seeds("3", 1234) == [1234, 1235, 1236]
    assert study.parse_seeds("7,1", 0) == [7, 1]
    for bad in ("x", "0", "1,1"):
        with pytest.raises(study.StudyError):
            study.parse_seeds(bad, 0)


def test_run_commands_pair_arms_by_seed_and_start_from_the_shared_checkpoint(tmp_path):
    s, cfg = make(tmp_path, ["--arms", "lampo,grpo,sft_control", "--seeds", "2"])
    lampo, grpo = s.run_command("lampo", 1235, cfg), s.run_command("grpo", 1235, cfg)
    for cmd in (lampo, grpo):
        assert "run.seed=1235" in cmd and f"model.path={s.sft_checkpoint}" in cmd and "run.stages=[rl]" in cmd
    assert "rl.algorithm.advantage=lampo" in lampo and "rl.algorithm.advantage=grpo" in grpo
    # everything but the arm's own override and the run folder is the same across arms
    differ = set(lampo) ^ set(grpo)
    assert all(a.startswith(("run.dir=", "rl.algorithm.advantage=")) for a in differ), differ
    ctl = s.run_command("sft_control", 1235, cfg)
    assert "run.stages=[sft]" in ctl and f"sft.steps={cfg.rl.iterations}" in ctl  # one optimizer step / iteration
    assert f"sft.lr={cfg.sft.lr * cfg.sft.min_lr_ratio!r}" in ctl and "sft.min_lr_ratio=1.0" in ctl
    assert study.rl_optimizer_steps(load_config(TINY, ["rl.mini_batch_size=64", "rl.algorithm.ppo_epochs=2"])) == \
        cfg.rl.iterations * 2 * 4
    greedy = s.eval_command(Path("m"), Path("o"), 1235, sampled=False)
    sampled = s.eval_command(Path("m"), Path("o"), 1235, sampled=True)
    arg = lambda cmd, flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert (arg(greedy, "--samples"), arg(greedy, "--temperature"), arg(greedy, "--limit")) == ("1", "0.0", "4000")
    assert (arg(sampled, "--samples"), arg(sampled, "--limit")) == ("8", "1000")
    assert float(arg(sampled, "--temperature")) == cfg.rollout.temperature and arg(sampled, "--seed") == "1235"


def test_the_design_is_fixed_once_written_but_arms_and_seeds_may_be_added(tmp_path):
    s, _ = make(tmp_path, ["--arms", "lampo,grpo", "--seeds", "2"])
    s.fix_design()
    s2, _ = make(tmp_path, ["--arms", "lampo,rloo", "--seeds", "1236,1234"])
    s2.fix_design()
    d = json.loads((s.out / "study.json").read_text())
    assert list(d["arms"]) == ["lampo", "grpo", "rloo"] and d["seeds"] == [1234, 1235, 1236]
    custom, _ = make(tmp_path, ["--arms", "lampo", "--arm", "x=rl.lr=1e-5"])  # a new custom arm: fine
    custom.fix_design()
    s3, _ = make(tmp_path, ["--arms", "lampo", "--arm", "x=rl.lr=2e-5"])  # same name, other meaning
    with pytest.raises(study.StudyError, match="different design.*arm x"):
        s3.fix_design()
    s4, _ = make(tmp_path, ["--arms", "lampo", "--eval-limit", "100"])
    with pytest.raises(study.StudyError, match="evaluation"):
        s4.fix_design()
    s5, _ = make(tmp_path, ["rl.lr=1e-5", "--arms", "lampo"])
    with pytest.raises(study.StudyError, match="overrides"):
        s5.fix_design()


# --------------------------------------------------------------------------------------------------------------------
# statistics


def test_t_interval_matches_scipy_and_paired_uses_common_seeds_only():
    xs = [0.61, 0.66, 0.70, 0.58]
    m, lo, hi = study_report.t_interval(xs)
    ref = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 4, scale=stats.sem(xs))
    assert m == pytest.approx(sum(xs) / 4) and (lo, hi) == pytest.approx(ref)
    assert math.isnan(study_report.t_interval([0.5])[1])
    d, dlo, dhi, n = study_report.paired({1: 0.7, 2: 0.6, 3: 0.9}, {1: 0.6, 2: 0.4, 4: 0.0})
    assert n == 2 and d == pytest.approx(0.15)  # seed 3 and 4 have no partner
    assert (dlo, dhi) == pytest.approx(stats.t.interval(0.95, 1, loc=0.15, scale=stats.sem([0.1, 0.2])))


def _data(values: dict[str, dict[int, float]], sft: float = 0.5) -> dict:
    design = {"config": TINY, "overrides": [], "seeds": [1, 2, 3], "reference_arm": "grpo",
              "arms": {a: {"overrides": [], "kind": "rl", "about": a} for a in values},
              "evaluation": {"sample_k": 2, "eval_limit": 10, "sample_limit": 5, "sample_temperature": 1.0,
                             "curve_limit": 5, "curve_every": 1, "benchmarks": ["tiny"]}}
    runs = {a: {str(s): {"greedy": v, "avg@2": v, "pass@2": v, "se_eval": 0.01, "curve": {}, "train": {},
                         "tokens_per_iteration": {}} for s, v in vals.items()} for a, vals in values.items()}
    data = {"design": design, "benchmark": "tiny", "runs": runs,
            "sft": {"greedy": sft, "avg@2": sft, "pass@2": sft, "curve": None, "se_eval": 0.01}}
    data["summary"] = study_report.summarize(data)
    return data


def test_the_report_states_who_wins_from_the_paired_intervals(tmp_path):
    data = _data({"grpo": {1: 0.60, 2: 0.50, 3: 0.70}, "lampo": {1: 0.65, 2: 0.56, 3: 0.74},
                  "rloo": {1: 0.50, 2: 0.45, 3: 0.60}, "sft_control": {1: 0.70, 2: 0.40, 3: 0.60}}, sft=0.4)
    text = study_report.render(data, [])
    assert "**lampo beats grpo**: +5.0 points" in text
    assert "**rloo is worse than grpo**" in text
    assert "sft_control vs grpo: no detectable difference" in text
    assert "- sft_control does not differ detectably from SFT" in text
    assert "- lampo gains over SFT" in text and "per seed +25.0, +16.0, +34.0" in text
    row = data["summary"]["lampo"]["greedy"]
    assert row["mean"] == pytest.approx((0.65 + 0.56 + 0.74) / 3) and row["vs_ref"]["n"] == 3
    assert study_report.plot(data, tmp_path) == ["final_accuracy.png", "paired_vs_reference.png",
                                                 "learning_curves.png", "stability.png", "pairwise.png"]


# --------------------------------------------------------------------------------------------------------------------
# end to end, with a kill


def _study_processes(out: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(out).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_a_two_arm_two_seed_study_survives_a_kill_and_reports(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "benchmarks.study", TINY, *SMALL, "--arms", "lampo,sft_control", "--seeds", "2",
           "--out", str(out), *SMALL_FLAGS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = out / "runs" / "lampo" / "seed_1234" / "final_eval" / "sampled" / "results.json"
    deadline = time.time() + 600
    while not done.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert done.exists(), first.communicate()[0] if first.poll() is not None else "no run finished in time"
    first.send_signal(signal.SIGKILL)  # the study itself, mid-way through the next run
    first.wait()
    time.sleep(1.0)
    assert _study_processes(out) == []  # its children died with it: nothing keeps writing into the study
    sft_weights = out / "sft" / "sft" / "final" / "model.safetensors"
    stamps = {p: p.stat().st_mtime_ns for p in (sft_weights, done)}

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "shared SFT checkpoint: training" not in second.stdout  # the SFT checkpoint is reused
    assert "lampo.seed_1234: training" not in second.stdout  # so is a finished run
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"lampo", "sft_control"}
    assert all(set(r) == {"1234", "1235"} for r in res["runs"].values())
    for arm, runs in res["runs"].items():
        for r in runs.values():
            assert 0 <= r["greedy"] <= 1 and 0 <= r["avg@2"] <= r["pass@2"] <= 1
            if arm == "lampo":
                assert set(r["curve"]) == {"0", "1", "2"}  # the SFT start, iteration 1, the final policy
                assert len(r["train"]["entropy"]) == 2 and len(r["tokens_per_iteration"]) == 2
            else:  # more SFT for as many optimizer steps as the RL arm took (2): its start and its end
                assert set(r["curve"]) == {"0", "2"} and r["train"] == {}
    control = json.loads((out / "runs/sft_control/seed_1234/state/sft.json").read_text())
    assert control["status"] == "done" and control["step"] == 2
    lampo_1234 = json.loads((out / "runs/lampo/seed_1234/final_eval/greedy/results.json").read_text())
    assert res["runs"]["lampo"]["1234"]["greedy"] == lampo_1234["benchmarks"]["tiny"]["metrics"]["avg@1"]
    report = (out / "report.md").read_text()
    assert "| lampo | 2 |" in report and "| sft_control | 2 |" in report and "- lampo " in report
    for png in ("final_accuracy", "learning_curves", "stability", "pairwise"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a report on a subset of the arms, elsewhere; an arm the study does not hold is refused
    assert study_report.main([str(out), "--arms", "sft_control", "--out", str(tmp_path / "sub")]) == 0
    sub = json.loads((tmp_path / "sub" / "results.json").read_text())
    assert list(sub["runs"]) == ["sft_control"] and (tmp_path / "sub" / "plots" / "final_accuracy.png").is_file()
    assert study_report.main([str(out), "--arms", "grpo", "--out", str(tmp_path / "none")]) == 2
    # a second study on the same folder at the same time is refused
    with open(out / ".lock", "w") as fh:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_EX)
        third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 2 and "another study is running" in third.stderr


def test_the_gpu_study_config_dry_runs_on_cpu_and_writes_nothing(tmp_path, capfd):
    """configs/study_qwen2.5_0.5b_gsm8k.yaml through the GPU launcher: every command printed, and launch.sh's
    DRY_RUN plan accepts the SFT and RL layouts (from the shipped config.json, no download, no GPU)."""
    out = tmp_path / "gpu_study"
    rc = study.main([str(REPO / "configs" / "study_qwen2.5_0.5b_gsm8k.yaml"), "--arms", "core", "--seeds", "2",
                     "--launcher", "bash training_scripts/launch.sh", "--threads", "0", "--out", str(out),
                     "--dry-run"])
    printed = capfd.readouterr().out  # capfd: the launcher's plan is printed by a child process
    assert rc == 0, printed
    assert not out.exists()
    assert printed.count("$ bash training_scripts/launch.sh") == 1 + 5 * 2  # SFT + 5 arms x 2 seeds
    assert printed.count("ok        the layout divides and fits") == 2, printed
    assert "megatron: TP 1 x PP 1 x DP 8" in printed and "sglang: world 8 / rollout TP 1" in printed
    assert "--benchmarks gsm8k" in printed
