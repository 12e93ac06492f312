"""Rollout and evaluation on every rank: the tiny pipeline under ``torchrun --nproc_per_node 2`` with one HF engine
per rank (``rollout.tensor_parallel=1``) over gloo, against the one-process run.

The split must be invisible: the gathered scored batch of every iteration (token ids, rewards, advantages) and the
final evaluation table equal the one-process run's. A rank killed mid-run makes the other exit with an error (no
hang), and rerunning resumes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline.test_runner import ROOT, SMALL, run_cli

# 4 prompts x 4 samples per iteration in generation batches of 2 prompts: two granules, one per engine; 16 held-out
# problems in evaluation batches of 2 (rollout.batch_size // eval.samples = 8): eight batches, four per engine
# rl.reward.timeout_s: answer checks are time-bounded, so on a loaded machine a check can time out and score 0 in one
# run and not the other; the comparison is exact, so the bound is made generous
SPLIT = ["rollout.batch_size=8", "rollout.tensor_parallel=1", "eval.limit=16", "run.collective_timeout_min=1",
         "rl.reward.timeout_s=120"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir: Path, *extra: str, nproc: int = 2, env_extra: dict | None = None, timeout: float = 900):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMPO_FAULT")}
    env.update({"PYTHONPATH": str(ROOT), **(env_extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "pipeline", "run", "configs/tiny.yaml",
           f"run.dir={run_dir}", *SMALL, *SPLIT, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


FIELDS = ("group", "response_ids", "reward_components", "reward", "advantage")


def scored(run_dir: Path) -> list[list[tuple]]:
    out = []
    for f in sorted((run_dir / "rl" / "rollouts").glob("iter_*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out.append([tuple(r[k] for k in FIELDS) for r in rows])
    return out


def first_difference(got: list[list[tuple]], want: list[list[tuple]]) -> str:
    """Where two runs' scored batches part (iteration, row, field), for the failure message."""
    for it, (g, w) in enumerate(zip(got, want), 1):
        for row, (a, b) in enumerate(zip(g, w)):
            for k, x, y in zip(FIELDS, a, b):
                if x != y:
                    return f"iteration {it}, row {row}, {k}: {x!r} != {y!r}"
    return f"{len(got)} vs {len(want)} iterations"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    res = run_cli(run_dir, *SPLIT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 rollout engine(s)" in res.stdout
    return run_dir


def test_two_engines_gather_the_batch_one_engine_produces(one_process, tmp_path):
    res = torchrun(tmp_path / "two")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "2 rollout engine(s) of 1 rank(s)" in res.stdout
    want, got = scored(one_process), scored(tmp_path / "two")
    assert len(want) == 3 and got == want, first_difference(got, want)
    assert len({g for g, *_ in want[0]}) == 4  # every prompt of the iteration, from both engines
    assert (tmp_path / "two" / "eval" / "summary.md").read_text() == (one_process / "eval" / "summary.md").read_text()
    assert not list((tmp_path / "two").rglob("responses.partial*"))


def test_a_killed_rank_stops_the_other_and_a_rerun_resumes(one_process, tmp_path):
    run_dir = tmp_path / "killed"
    # rank 1 (LOCAL_RANK 1) dies at its second RL rollout; rank 0 must not wait forever in the gather
    t = time.monotonic()
    res = torchrun(run_dir, env_extra={"LAMPO_FAULT": "rl_rollout:2", "LAMPO_FAULT_RANK": "1"})
    assert res.returncode != 0
    assert time.monotonic() - t < 300
    assert f"exitcode  : {-signal.SIGKILL}" in res.stderr or "Signal 9" in res.stderr or "SIGKILL" in res.stderr, \
        res.stderr[-3000:]
    resumed = torchrun(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    assert scored(run_dir) == scored(one_process), first_difference(scored(run_dir), scored(one_process))
    assert (run_dir / "eval" / "summary.md").read_text() == (one_process / "eval" / "summary.md").read_text()


@pytest.mark.parametrize("rank1_sees_it", [True, False])
def test_run_folder_must_be_shared_by_every_rank(monkeypatch, tmp_path, rank1_sees_it):
    """Two ranks faked in one process: rank 1 either reads rank 0's token back or not (another node's disk)."""
    from pipeline import dist, runner
    from pipeline.checks import PipelineError
    from pipeline.state import RunDir

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast", lambda obj: obj)
    monkeypatch.setattr(dist, "all_gather", lambda mine: [mine, (rank1_sees_it, "node-b")])
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    if rank1_sees_it:
        runner.check_shared_run_dir(rd)
    else:
        with pytest.raises(PipelineError, match=r"not the same folder on every rank: rank\(s\) 1 on node-b"):
            runner.check_shared_run_dir(rd)
    assert len((tmp_path / "run" / ".shared_run_dir").read_text()) == 32  # rank 0 wrote its token
