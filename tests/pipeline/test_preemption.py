"""Preemption: SIGTERM (and SIGINT, SIGUSR1) stops a run at its next safe point with a checkpoint, exit status 75, and
the same command resumes there to end with the weights of an uninterrupted run.

The runs are ``test_runner``'s tiny pipeline in a subprocess; the signal comes from ``pipeline.faults``
(``LAMPO_FAULT=POINT:N:TERM`` sends SIGTERM to the process itself the N-th time it reaches POINT), so it lands at a
known moment: SFT checkpoints regularly at steps 4 and 8 of 12, RL runs 3 iterations of 2 updates each.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.preempt import EXIT_PREEMPTED
from tests.pipeline import test_runner
from tests.pipeline.test_runner import final_weights, run_cli

reference = test_runner.reference  # the same module-scoped fixture: one uninterrupted run per module

RL_SPARSE = "rl.checkpoint_every=3"  # RL writes no checkpoint of its own before the last iteration


def state(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "state" / f"{stage}.json").read_text())


def assert_same_final(run_dir: Path, reference: Path) -> None:
    for stage in ("sft", "rl"):
        want = load_file(reference / stage / "final" / "model.safetensors")
        got = load_file(run_dir / stage / "final" / "model.safetensors")
        assert got.keys() == want.keys()
        for k, w in want.items():
            assert torch.equal(got[k], w), f"{stage}/final {k} differs from the uninterrupted run"
    assert (run_dir / "eval" / "summary.md").read_text() == (reference / "eval" / "summary.md").read_text()


def assert_preempted(res, stage: str, where: str) -> None:
    assert res.returncode == EXIT_PREEMPTED, (res.returncode, res.stderr[-3000:])
    lines = [x for x in res.stderr.splitlines() if x.startswith("preempted")]
    assert len(lines) == 1 and f"stage {stage}" in lines[0] and where in lines[0], res.stderr[-3000:]


def test_sigterm_during_sft_checkpoints_that_step_and_resumes_identically(reference, tmp_path):
    run_dir = tmp_path / "run"
    # the signal arrives as step 6 starts: step 6 finishes, is checkpointed (SFT's own checkpoints are 4 and 8), exit
    res = run_cli(run_dir, fault="sft_step:6:TERM")
    assert_preempted(res, "sft", "step 6")
    assert "sft/checkpoints/step_000006" in res.stderr
    st = state(run_dir, "sft")
    assert st["status"] == "preempted" and st["step"] == 6 and st["checkpoint"] == "sft/checkpoints/step_000006"
    assert st["extra"]["preempted"]["signal"] == "SIGTERM"
    assert (run_dir / "sft" / "checkpoints" / "step_000006" / "MANIFEST.json").is_file()
    assert not (run_dir / "state" / "rl.json").exists()  # nothing after the safe point ran
    resumed = run_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from sft/checkpoints/step_000006 (step 6)" in resumed.stdout
    assert_same_final(run_dir, reference)


@pytest.mark.parametrize("fault", ["rl_update:3:TERM", "rl_rollout:2:TERM"])
def test_sigterm_during_rl_stops_after_that_iterations_update_and_resumes_identically(reference, tmp_path, fault):
    """Iteration 2's first update, or its rollout: the iteration is finished, checkpointed (the config's own RL
    checkpoint comes at iteration 3 only), and the run exits."""
    run_dir = tmp_path / "run"
    res = run_cli(run_dir, RL_SPARSE, fault=fault)
    assert_preempted(res, "rl", "iteration 2")
    st = state(run_dir, "rl")
    assert st["status"] == "preempted" and st["step"] == 2 and st["checkpoint"] == "rl/checkpoints/step_000002"
    assert sorted(p.name for p in (run_dir / "rl" / "rollouts").iterdir()) == ["iter_00001.jsonl", "iter_00002.jsonl"]
    resumed = run_cli(run_dir, RL_SPARSE)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from rl/checkpoints/step_000002 (iteration 2)" in resumed.stdout
    assert_same_final(run_dir, reference)


def test_sigint_stops_sft_at_the_next_step_too(tmp_path):
    res = run_cli(tmp_path / "run", "run.stages=[sft]", fault="sft_step:3:INT")
    assert_preempted(res, "sft", "step 3")
    assert state(tmp_path / "run", "sft")["extra"]["preempted"]["signal"] == "SIGINT"
    assert (tmp_path / "run" / "sft" / "checkpoints" / "step_000003" / "MANIFEST.json").is_file()


def test_sigusr1_during_evaluation_stops_between_batches_and_the_rerun_completes(reference, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(run_dir, fault="eval_batch:1:USR1")  # after the first evaluation batch (of the SFT checkpoint)
    assert_preempted(res, "evaluate", "sft")
    assert state(run_dir, "evaluate")["status"] == "preempted"
    assert not (run_dir / "eval" / "summary.md").exists()
    resumed = run_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final(run_dir, reference)


def test_a_step_that_outlasts_the_grace_period_exits_without_writing(reference, tmp_path):
    """run.preempt_grace_s=0.001: step 6 cannot finish in time, so the process exits at once with status 75 and
    writes nothing; the state still points at the checkpoint of step 4, and the rerun resumes there."""
    run_dir = tmp_path / "run"
    res = run_cli(run_dir, "run.preempt_grace_s=0.001", fault="sft_step:6:TERM")
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-3000:]
    assert "run.preempt_grace_s=0.001" in res.stderr and "without writing a checkpoint" in res.stderr
    assert sorted(p.name for p in (run_dir / "sft" / "checkpoints").iterdir()) == ["step_000004"]
    assert state(run_dir, "sft")["checkpoint"] == "sft/checkpoints/step_000004"
    resumed = run_cli(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from sft/checkpoints/step_000004 (step 4)" in resumed.stdout
    assert_same_final(run_dir, reference)


def test_the_sigkill_fault_still_kills(tmp_path):
    res = run_cli(tmp_path / "run", "run.stages=[sft]", fault="sft_step:2")
    assert res.returncode == -signal.SIGKILL


# --- the module on its own, in this process --------------------------------------------------------------------
def test_a_signal_is_only_recorded_and_one_process_needs_no_collective(monkeypatch):
    from pipeline import dist, preempt

    monkeypatch.setattr(dist, "max_over_ranks", lambda v: pytest.fail("a collective in one process"))
    preempt.install(grace_s=30)
    try:
        assert not preempt.requested() and not preempt.agreed()
        signal.raise_signal(signal.SIGTERM)  # would end the process without the handler
        assert preempt.requested() and preempt.agreed() and preempt.signal_name() == "SIGTERM"
    finally:
        preempt.uninstall()
    assert not preempt.requested()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_watchdog_ends_the_process_when_the_grace_period_expires(tmp_path):
    """A main thread blocked in a long C call (here: sleep) never reaches a safe point: the watchdog thread, woken
    through the signal wake-up file descriptor, exits with status 75 when the grace period is over."""
    import subprocess
    import sys

    from tests.pipeline.test_runner import ROOT

    code = ("import os, signal, time\nfrom pipeline import preempt\npreempt.install(grace_s=0.5)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\n")
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == EXIT_PREEMPTED, res.stderr
    assert time.monotonic() - t < 20 and "without writing a checkpoint" in res.stderr


def test_a_signal_after_the_run_is_over_changes_nothing(tmp_path):
    """``python -m pipeline run`` calls finish() once the run is over: a SIGTERM while Python shuts down is ignored,
    so the exit status stays the run's."""
    import subprocess
    import sys

    from tests.pipeline.test_runner import ROOT

    code = ("import os, signal, sys\nfrom pipeline import preempt\npreempt.install(grace_s=30)\npreempt.finish()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nsys.exit(0 if not preempt.requested() else 3)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


ENTRY = """
import json, signal, sys
from pipeline import preempt
real, heavy = preempt.install, []
def install(*a, **k):
    heavy.append(sorted(m for m in ("torch", "transformers", "pipeline.runner") if m in sys.modules))
    return real(*a, **k)
preempt.install = install
module, func = sys.argv[1].split(":")
sys.argv = [sys.argv[2], *sys.argv[3:]]
try:
    getattr(__import__(module, fromlist=[func]), func)()  # what a console script's wrapper does
except SystemExit:
    pass
print(json.dumps({"heavy": heavy, "after": signal.getsignal(signal.SIGTERM) is signal.SIG_IGN}))
"""


@pytest.mark.parametrize(("name", "argv"), [("lampo", ["run", "--help"]), ("lampo-run", ["--help"])])
def test_console_commands_install_the_handlers_before_the_heavy_imports(name, argv):
    """``lampo run`` and ``lampo-run`` (pyproject.toml's console scripts) guard a run like ``python -m pipeline run``:
    the stop handlers are installed before torch and the runner are imported (a SIGTERM during those seconds is a
    stop request, not the end), and a late signal once the run is over is ignored."""
    import subprocess
    import sys
    import tomllib

    from tests.pipeline.test_runner import ROOT

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    res = subprocess.run([sys.executable, "-c", ENTRY, scripts[name], name, *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"heavy": [[]], "after": True}, (scripts[name], out)


def test_grace_must_be_positive():
    from pipeline.config import ConfigError, load_config

    assert load_config(None).run.preempt_grace_s == 60.0
    with pytest.raises(ConfigError, match="run.preempt_grace_s"):
        load_config(None, ["run.preempt_grace_s=0"])


def test_preemption_settings_may_change_on_resume(reference):
    res = run_cli(reference, "run.preempt_grace_s=5", "run.max_nonfinite_in_a_row=7")
    assert res.returncode == 0, res.stderr[-2000:]


# --- two ranks: the signal reaches rank 1 only ---------------------------------------------------------------------
def test_sigterm_on_one_rank_stops_both_at_the_same_iteration_and_resumes_identically(tmp_path, tmp_path_factory):
    """torchrun, 2 gloo ranks: only rank 1 is signalled (in iteration 2's first update). The ranks agree at the next
    safe point (an all-reduce of the stop flag), both stop after iteration 2, and the rerun ends where a one-process
    uninterrupted run ends."""
    from tests.pipeline.test_multiprocess import SPLIT, first_difference, scored, torchrun

    one = tmp_path_factory.mktemp("one") / "run"
    ref = run_cli(one, *SPLIT, RL_SPARSE)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "two"
    t = time.monotonic()
    res = torchrun(run_dir, RL_SPARSE, env_extra={"LAMPO_FAULT": "rl_update:3:TERM", "LAMPO_FAULT_RANK": "1"})
    assert res.returncode != 0 and time.monotonic() - t < 300
    lines = sorted(x for x in res.stderr.splitlines() if x.startswith("preempted"))
    assert len(lines) == 2, res.stderr[-4000:]
    assert all("stage rl at iteration 2" in x for x in lines), lines
    assert "rank 0 of 2" in lines[0] and "rank 1 of 2" in lines[1], lines
    assert "exitcode  : 75" in res.stderr or f"exitcode  : {EXIT_PREEMPTED}" in res.stderr, res.stderr[-3000:]
    st = state(run_dir, "rl")
    assert st["step"] == 2 and st["checkpoint"] == "rl/checkpoints/step_000002"
    resumed = torchrun(run_dir, RL_SPARSE)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from rl/checkpoints/step_000002 (iteration 2)" in resumed.stdout
    assert scored(run_dir) == scored(one), first_difference(scored(run_dir), scored(one))
    want, got = final_weights(one), final_weights(run_dir)
    assert all(torch.equal(got[k], w) for k, w in want.items())
    assert (run_dir / "eval" / "summary.md").read_text() == (one / "eval" / "summary.md").read_text()


def test_sigterm_on_one_rank_during_evaluation_stops_both_between_batches(tmp_path, tmp_path_factory):
    """torchrun, 2 ranks, each rollout engine evaluating its own batches (no collective between them): rank 1 is
    signalled after its first evaluation batch; it posts the request in the shared run folder, both stop between
    batches and agree, and the rerun writes the one-process run's evaluation table."""
    from tests.pipeline.test_multiprocess import SPLIT, torchrun

    one = tmp_path_factory.mktemp("one") / "run"
    assert run_cli(one, *SPLIT, "run.stages=[sft,evaluate]").returncode == 0
    run_dir = tmp_path / "two"
    res = torchrun(run_dir, "run.stages=[sft,evaluate]",
                   env_extra={"LAMPO_FAULT": "eval_batch:1:TERM", "LAMPO_FAULT_RANK": "1"})
    lines = sorted(x for x in res.stderr.splitlines() if x.startswith("preempted"))
    assert len(lines) == 2 and all("stage evaluate while evaluating sft" in x for x in lines), res.stderr[-4000:]
    assert (run_dir / ".preempt_requested").is_file()
    resumed = torchrun(run_dir, "run.stages=[sft,evaluate]")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert not (run_dir / ".preempt_requested").exists()  # the rerun forgot the old request
    assert (run_dir / "eval" / "summary.md").read_text() == (one / "eval" / "summary.md").read_text()


# --- torchrun's own signal handling -----------------------------------------------------------------------------------
def test_torchrun_that_kills_before_the_grace_period_is_over_is_named():
    from pipeline.preempt import torchrun_shutdown_s, torchrun_warnings

    assert torchrun_warnings(60, env={}, agent_argv=[]) == []  # not under torchrun
    env = {"TORCHELASTIC_RUN_ID": "x"}
    default = torchrun_warnings(60, env=env, agent_argv=["python", "-m", "torch.distributed.run", "-m", "pipeline"])
    assert len(default) == 2 and "30 s after it forwards a stop signal" in default[0], default
    assert "--shutdown-timeout 90" in default[0] and "does not forward SIGUSR1" in default[1]
    argv = ["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "8", "--shutdown-timeout", "90", "-m",
            "pipeline", "run", "c.yaml", "--shutdown-timeout", "1"]  # the worker's arguments are not torchrun's
    fit = {**env, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    assert torchrun_shutdown_s(fit, argv) == 90 and torchrun_warnings(60, env=fit, agent_argv=argv) == []
    assert torchrun_shutdown_s(env, ["python", "-m", "torch.distributed.run", "--shutdown_timeout=20"]) == 20
    assert torchrun_shutdown_s({**env, "PET_SHUTDOWN_TIMEOUT": "45"}, []) == 45
    assert torchrun_shutdown_s({**env, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "50"}, []) == 50
    assert "45 s after" in torchrun_warnings(60, env={**fit, "PET_SHUTDOWN_TIMEOUT": "45"}, agent_argv=[])[0]
    assert torchrun_warnings(40, env={**fit, "PET_SHUTDOWN_TIMEOUT": "45"}, agent_argv=[]) == []


def test_a_real_torchrun_agent_is_read_by_its_workers():
    """The worker reads its agent's --shutdown-timeout from the agent's command line."""
    import subprocess
    import sys

    from tests.pipeline.test_multiprocess import free_port
    from tests.pipeline.test_runner import ROOT

    code = "from pipeline.preempt import torchrun_shutdown_s; print('agent waits', torchrun_shutdown_s())"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                          str(free_port()), "--shutdown-timeout", "95", "--no-python", sys.executable, "-c", code],
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "agent waits 95.0" in res.stdout, res.stdout


def test_the_gpu_launcher_gives_torchrun_the_grace_period_and_sigusr1(tmp_path):
    """training_scripts/launch.sh (a fake torchrun on PATH prints its arguments): --shutdown-timeout is the config's
    run.preempt_grace_s (with the overrides) plus 30 s, and SIGUSR1 is forwarded."""
    import os
    import subprocess
    import sys

    from tests.pipeline.test_runner import ROOT

    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\necho "torchrun $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NPROC": "2",
           "PATH": f"{tmp_path}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("DRY_RUN", None)
    launch = str(ROOT / "training_scripts" / "launch.sh")
    for extra, want in (([], 90), (["run.preempt_grace_s=100.5", "--force"], 131)):
        res = subprocess.run(["bash", launch, "configs/tiny.yaml", *extra], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        assert f"--shutdown-timeout {want} --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in res.stdout
        assert res.stdout.rstrip().endswith(" ".join(["-m pipeline run configs/tiny.yaml", *extra]))
