"""The kill suite (``python -m pipeline.killsuite``): a short run of it passes, and its checkers see what they must
(an unreadable file, a checkpoint that does not match its manifest, a tensor that differs)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.killsuite import BAR, PREEMPTED, compare, scan, where_now
from pipeline.state import write_manifest
from tests.pipeline.test_runner import ROOT


def make_run(root: Path, scale: float = 1.0) -> Path:
    for name in ("sft/final", "rl/final"):
        (root / name).mkdir(parents=True)
        save_file({"w": torch.ones(3) * scale}, str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text("{}")
    (root / "eval").mkdir()
    (root / "eval" / "summary.md").write_text("| tiny | avg@1 | 1.0% |\n")
    ckpt = root / "sft" / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.pt").write_bytes(b"x" * 10)
    write_manifest(ckpt)
    (root / "state").mkdir()
    (root / "state" / "sft.json").write_text(json.dumps({"status": "done"}))
    return root


def test_a_clean_run_folder_scans_clean_and_equals_itself(tmp_path):
    run = make_run(tmp_path / "a")
    half = run / "rl" / "checkpoints" / "step_000002.tmp"  # a checkpoint a kill cut short: the next run removes it
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"torn")
    (run / "eval" / "tiny").mkdir()
    (run / "eval" / "tiny" / "responses.partial.jsonl").write_text('{"a": 1}\n{"a": ')  # a torn last line is allowed
    assert scan(run) == []
    assert compare(run, make_run(tmp_path / "b")) == []


def test_scan_names_every_unreadable_file(tmp_path):
    run = make_run(tmp_path / "a")
    (run / "state" / "rl.json").write_text('{"status": ')
    f = run / "rl" / "final" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    (run / "sft" / "checkpoints" / "step_000004" / "trainer_state.pt").write_bytes(b"y" * 10)
    (run / "sft" / "checkpoints" / "step_000008").mkdir()  # no manifest
    (run / "rl" / "rollouts").mkdir()
    (run / "rl" / "rollouts" / "iter_00001.jsonl").write_text('{"a": 1}\nnot json\n')
    problems = "\n".join(scan(run))
    for fragment in ("state/rl.json: unreadable", "rl/final/model.safetensors: unreadable",
                     "sft/checkpoints/step_000004: trainer_state.pt has sha256",
                     "step_000008: MANIFEST.json is missing", "iter_00001.jsonl: unreadable (ValueError: line 2"):
        assert fragment in problems, problems
    assert len(scan(run)) == 5


def test_compare_names_a_differing_tensor_and_summary(tmp_path):
    ref, other = make_run(tmp_path / "a"), make_run(tmp_path / "b", scale=1.0 + 1e-7)
    (other / "eval" / "summary.md").write_text("| tiny | avg@1 | 2.0% |\n")
    assert compare(ref, other) == ["sft/final: w differs", "rl/final: w differs", "eval/summary.md differs"]


def test_where_a_kill_landed_and_how_a_preempted_run_said_it_stopped(tmp_path):
    run = make_run(tmp_path / "a")
    (run / "config.yaml").write_text("")
    (run / "state" / "rl.json").write_text(json.dumps({"status": "running"}))
    bars = "sft: 100%|##########| 12/12 [00:01<00:00]\rrl:   0%|          | 0/3\rrl:  33%|###3      | 1/3 [00:01<00:02]"
    assert where_now(run, bars) == "rl 1/3"
    assert where_now(run, "") == "rl (starting)"
    assert BAR.findall("\rtiny:  50%|#####     | 3/6 [00:00<00:00]")[-1] == ("tiny", "3", "6")
    line = "preempted (SIGTERM) in stage rl at iteration 2 [rank 1 of 2]: checkpoint rl/checkpoints/step_2 written"
    assert PREEMPTED.findall(line) == [("SIGTERM", "rl", "at iteration 2")]


def test_three_kills_end_identical(tmp_path):
    """The suite end to end on the shortened tiny pipeline: a reference run, then three kills (a mix of SIGKILL and
    SIGTERM) with restarts; every completed run must equal the reference."""
    out = tmp_path / "suite"
    res = subprocess.run([sys.executable, "-m", "pipeline.killsuite", "--kills", "3", "--seed", "3", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    assert "verdict: PASS" in res.stdout
    table = res.stdout[res.stdout.index("#  trial"):]
    rows = [x for x in table.splitlines() if re.match(r"\d+\s+\d+\s+\d+\s+(KILL|TERM)\s", x)]
    assert len(rows) == 3, table
    assert (out / "reference" / "rl" / "final" / "model.safetensors").is_file()


def test_a_sigkill_takes_the_ranks_torchrun_started_in_sessions_of_their_own():
    """torchrun starts each rank with start_new_session=True: killing torchrun's process group alone would leave the
    ranks running on into the next attempt. A stand-in agent starts a 'rank' (RANK in its environment) the same way."""
    import os
    import time

    from pipeline.killsuite import kill_all, ranks_of

    agent = ("import os, subprocess, sys, time\n"
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True,"
             " env={**os.environ, 'RANK': '0'})\n"
             "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", agent], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (ranks := ranks_of(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(ranks) == [0]
        rank = ranks[0]
        assert os.getpgid(rank) != os.getpgid(proc.pid)  # its own session and group, as under torchrun
        kill_all(proc)
        assert proc.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while Path(f"/proc/{rank}").exists() and Path(f"/proc/{rank}/stat").read_text().split()[2] != "Z" \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = Path(f"/proc/{rank}").exists() and Path(f"/proc/{rank}/stat").read_text().split()[2] != "Z"
        assert not alive, "the rank outlived the SIGKILL"
    finally:
        kill_all(proc)
