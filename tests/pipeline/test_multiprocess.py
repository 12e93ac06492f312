"""Rollout and evaluation on every rank: the tiny pipeline under ``torchrun --nproc_per_node 2`` with one HF engine
per rank (``rollout.tensor_parallel=1``) over gloo, against the one-process run.

The split must be invisible: the gathered scored batch of every iteration (token ids, rewards, advantages) and the
final evaluation table equal the one-process run's. A rank killed mid-run makes the other exit with an error (no
hang), and rerunning resumes: under torchrun with the torch backend, and with the DeepSpeed and Megatron backends
with the ranks started as plain processes (as on two nodes, where no torchrun agent stops the survivor for us), a
rank killed or frozen, the other stopping by itself within the collective timeout.
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


# --- DeepSpeed and Megatron: a dead or frozen rank, no torchrun agent ------------------------------------------------
# A cut-down run: SFT and RL (whose final weights are compared), no evaluation. RL has 2 updates per iteration and a
# checkpoint after each iteration: the fault hits iteration 2's first update (rl_update:3), after checkpoint step 1.
CUT = ["run.stages=[sft,rl]", "sft.steps=8"]
COLLECTIVE_S = 60  # SPLIT's run.collective_timeout_min=1
START_S = 120  # start-up, SFT and RL iteration 1 on a loaded machine, with room to spare


def plain_ranks(run_dir: Path, *extra: str, nproc: int = 2, env_extra: dict | None = None) -> list[subprocess.Popen]:
    """The ranks of a run started as plain processes with the environment torchrun gives them (as a multi-node launch
    has them: on one node, torchrun's agent SIGTERMs the other ranks as soon as one dies; an agent on another node
    cannot, so there a rank left alone must stop by itself). Each writes ``rankN.out``/``.err`` beside ``run_dir``."""
    port = free_port()
    procs = []
    for r in range(nproc):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMPO_FAULT")}
        env.update({"PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                    "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                    "OMP_NUM_THREADS": "1", **(env_extra or {})})
        cmd = [sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", f"run.dir={run_dir}", *SMALL, *SPLIT,
               *extra]
        out = run_dir.parent / f"rank{r}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".out"), "w") as o, open(out.with_suffix(".err"), "w") as e:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def log(run_dir: Path, rank: int, kind: str = "err") -> str:
    return (run_dir.parent / f"rank{rank}.{kind}").read_text(errors="replace")


@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory):
    """``backend -> final RL weights`` of an uninterrupted 2-rank run of the cut-down config (once per backend)."""
    from safetensors.torch import load_file

    cache: dict = {}

    def get(backend: str) -> dict:
        if backend not in cache:
            run_dir = tmp_path_factory.mktemp(f"ref_{backend}") / "run"
            rcs = wait_all(plain_ranks(run_dir, f"backend.name={backend}", *CUT))
            assert rcs == [0, 0], log(run_dir, 0)[-3000:] + log(run_dir, 1)[-3000:]
            cache[backend] = load_file(run_dir / "rl" / "final" / "model.safetensors")
        return cache[backend]

    return get


@pytest.mark.parametrize(("backend", "fault"), [("deepspeed", "KILL"), ("megatron", "KILL"), ("megatron", "STOP")])
def test_a_dead_or_frozen_rank_stops_the_other_and_a_rerun_resumes(plain_reference, tmp_path, backend, fault):
    """Rank 1 is killed (SIGKILL: gloo sees the connection close) or frozen (SIGSTOP: only the collective timeout of
    the process groups, megatron-core's own included, ends the wait) in an RL update. Rank 0 must stop by itself with
    the one-line error and status 3, and the same command then resumes and ends with the uninterrupted run's weights."""
    import torch
    from safetensors.torch import load_file

    from pipeline.runner import EXIT_LOST_RANK

    pytest.importorskip("deepspeed" if backend == "deepspeed" else "megatron.core")
    want = plain_reference(backend)
    run_dir = tmp_path / "run"
    t = time.monotonic()
    rank0, rank1 = plain_ranks(run_dir, f"backend.name={backend}", *CUT,
                               env_extra={"LAMPO_FAULT": f"rl_update:3:{fault}", "LAMPO_FAULT_RANK": "1"})
    try:
        rc0 = rank0.wait(timeout=START_S + COLLECTIVE_S + 60)
    except subprocess.TimeoutExpired:
        rc0 = None
    finally:
        for p in (rank0, rank1):
            p.kill()  # rank 1 is dead already, or frozen (SIGKILL ends a stopped process too)
            p.wait()
    assert rc0 is not None, f"rank 0 still waits {time.monotonic() - t:.0f} s after the start: it hangs"
    err = log(run_dir, 0)
    assert rc0 == EXIT_LOST_RANK, err[-4000:]
    assert "a collective operation failed: another rank died or hangs" in err, err[-4000:]
    assert "run the same command again to resume" in err
    if fault == "STOP":
        assert "Timed out" in err  # the process group's timeout ended the wait, not a closed connection
    assert rank1.returncode == -signal.SIGKILL
    rcs = wait_all(plain_ranks(run_dir, f"backend.name={backend}", *CUT))
    assert rcs == [0, 0], log(run_dir, 0)[-3000:] + log(run_dir, 1)[-3000:]
    assert "resumed from rl/checkpoints/step_000001" in log(run_dir, 0, "out")
    got = load_file(run_dir / "rl" / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_which_errors_count_as_a_lost_rank(monkeypatch):
    import torch.distributed as tdist

    from pipeline import dist, runner

    gloo_closed = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:8082")
    gloo_timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 60000ms for send")
    others = [RuntimeError("CUDA out of memory"), ValueError("gloo"), KeyError("x")]
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    assert all(runner.lost_rank(e) for e in (gloo_closed, gloo_timeout, tdist.DistBackendError("NCCL error")))
    assert not any(runner.lost_rank(e) for e in others)
    monkeypatch.setattr(dist, "world_size", lambda: 1)  # one process has no other rank to lose
    assert not runner.lost_rank(gloo_closed)
