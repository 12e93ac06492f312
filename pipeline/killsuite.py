"""The kill suite: kill a shortened tiny pipeline at random moments, resume it each time, and check that it ends with
exactly the result of an uninterrupted run and never leaves an unreadable file behind.

    python -m pipeline.killsuite [CONFIG] [key=value ...] [--kills 50] [--seed 0] [--nproc 2] [--out DIR]

1. One uninterrupted run of CONFIG (default ``configs/tiny.yaml``) shortened by :data:`SHORT` (then the given
   overrides) gives the reference result and its duration T.
2. Then ``--kills`` times: start the same command, wait a random delay drawn uniformly from [0, T), send SIGKILL (to
   every process of the attempt, each torchrun rank's own process group included: a lost node) or SIGTERM (a
   preemption: the run must checkpoint and exit with status 75 within ``run.preempt_grace_s``; with ``--nproc 2``, to
   one rank only, chosen at random), and start it again, until the run folder is complete; a completed folder is
   checked and a fresh one started while kills remain. An attempt that ends before its kill is simply a finished
   attempt. Kills land in every stage, roughly in proportion to the time each takes (the first seconds are Python's
   start-up).
3. After every kill the run folder is scanned (:func:`scan`): every ``.json`` parses, every ``.jsonl`` line parses
   (but the torn last line an evaluation's ``responses.partial*.jsonl`` may have, which a resume drops), every
   ``.safetensors`` loads, every checkpoint folder ``step_N`` matches its ``MANIFEST.json``; a ``*.tmp``/``*.old``
   folder is a half-written one that the next run removes, and is skipped. Each completed folder is compared with
   the reference (:func:`compare`): every tensor of ``sft/final`` and ``rl/final`` ``torch.equal``, the evaluation
   summary identical.
4. A table of the kills (where each landed: the stage running, per the state files, and how far its progress bar
   had got, which tqdm refreshes about every 0.1 s and so may lag a step or two; the signal; the exit status; what
   followed, for SIGTERM the exact step where the run stopped) and a verdict. Exit status 0 only when every
   completed run equals the reference, no scan found a problem, and every attempt ended as its signal says it must
   (SIGKILL: killed; SIGTERM: status 75, or 0 when the run was already finishing, or killed by the signal while
   Python was starting, outside the run).

``--nproc 2`` runs every attempt (and the reference) under ``torchrun`` with 2 gloo ranks on this machine.

Why a module of the pipeline rather than a script under benchmarks/: it checks the pipeline's own guarantees with the
pipeline's own checkers (:func:`pipeline.state.verify_manifest`), it ships with the package so that
``python -m pipeline.killsuite`` can qualify a new machine or file system where the project is installed, and the
tests import it; benchmarks/ holds measurements of speed and learning, not pass/fail checks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.preempt import EXIT_PREEMPTED
from pipeline.state import verify_manifest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/tiny.yaml"
# The tiny pipeline shortened to about ten seconds through every stage, of which Python's start-up takes a third or
# more: SFT (200 steps, a checkpoint every 40), RL (12 iterations of 2 updates, a checkpoint every 3: a SIGTERM between
# two writes one of its own), evaluation of both checkpoints (96 problems, 6 batches each). Answer checks get a generous
# time bound: on a loaded machine a check that times out scores 0 in one run and not in the other.
SHORT = (
    "run.threads=1", "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128",
    "sft.steps=200", "sft.checkpoint_every=40", "sft.warmup_steps=2", "sft.batch_size=8",
    "rl.iterations=12", "rl.prompts_per_iteration=4", "rollout.n_samples=4", "rl.mini_batch_size=8",
    "rl.checkpoint_every=3", "rollout.max_new_tokens=24", "rollout.batch_size=16", "backend.micro_batch_size=8",
    "rl.reward.dense=rouge_l", "rl.reward.alpha=0.5", "eval.limit=96", "eval.max_new_tokens=24",
    "data.tiny_train_size=200", "rl.reward.timeout_s=120",
)
MULTI = ("run.collective_timeout_min=2",)  # with --nproc > 1: a rank left alone fails in minutes, not hours
STAGES = ("sft", "rl", "evaluate")
FINALS = ("sft/final", "rl/final")
# a progress bar line: "sft:  42%|####2     | 5/12 [...]" (the evaluation's bars are named after the benchmark)
BAR = re.compile(r"(?:^|[\r\n])([\w.-]+):\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")
PREEMPTED = re.compile(r"^preempted \(([^)]*)\) in stage (\S+) ([^:\[]+?)(?: \[rank \d+ of \d+\])?:", re.MULTILINE)


# --- checks -----------------------------------------------------------------------------------------------------------
def scan(run_dir: Path) -> list[str]:
    """Unreadable files in a run folder (see the module docstring), one line each naming the file and what is wrong;
    ``*.tmp`` and ``*.old`` folders (half-written, removed by the next run) and their contents are skipped."""
    from safetensors.torch import load_file

    problems = []
    run_dir = Path(run_dir)
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if any(part.endswith((".tmp", ".old")) for part in rel.parts[:-1]):
            continue
        if p.is_dir():
            if p.parent.name == "checkpoints" and p.name.startswith("step_") and not p.name.endswith((".tmp", ".old")):
                problem = verify_manifest(p)
                if problem is not None:
                    problems.append(f"{rel}: {problem}")
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
            elif p.suffix == ".jsonl":
                lines = p.read_text(encoding="utf-8").splitlines()
                if p.name.startswith("responses.partial") and lines:
                    lines = lines[:-1]  # a kill may tear the last line; the resume drops it
                for n, line in enumerate(lines, 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except ValueError as e:
                            raise ValueError(f"line {n}: {e}") from None
            elif p.suffix == ".safetensors":
                load_file(p)
        except Exception as e:  # noqa: BLE001 - any failure to read the file is the finding, reported in one line
            problems.append(f"{rel}: unreadable ({type(e).__name__}: {e})")
    return problems


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files a kill left that no later run removes (harmless: nothing reads them)."""
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*")
                  if p.is_file() and (".tmp" in p.name or p.name.endswith(".old")))


def compare(reference: Path, run_dir: Path) -> list[str]:
    """Differences between a completed run folder and the reference: every tensor of the final checkpoints
    (``torch.equal``) and the evaluation summary."""
    import torch
    from safetensors.torch import load_file

    out = []
    for name in FINALS:
        want_f, got_f = Path(reference, name, "model.safetensors"), Path(run_dir, name, "model.safetensors")
        if not want_f.is_file():
            continue
        if not got_f.is_file():
            out.append(f"{name}/model.safetensors is missing")
            continue
        want, got = load_file(want_f), load_file(got_f)
        if want.keys() != got.keys():
            out.append(f"{name}: tensors {sorted(set(want) ^ set(got))} in one run only")
        out += [f"{name}: {k} differs" for k in sorted(want.keys() & got.keys()) if not torch.equal(want[k], got[k])]
    want_s, got_s = Path(reference, "eval", "summary.md"), Path(run_dir, "eval", "summary.md")
    if not got_s.is_file():
        out.append("eval/summary.md is missing")
    elif got_s.read_text() != want_s.read_text():
        out.append("eval/summary.md differs")
    return out


def where_now(run_dir: Path, stderr_text: str) -> str:
    """Where a run is: the first stage not done (state files) and, when its progress bar has shown, how far."""
    current = None
    for name in STAGES:
        f = Path(run_dir, "state", f"{name}.json")
        try:
            status = json.loads(f.read_text())["status"] if f.is_file() else "pending"
        except (ValueError, KeyError, OSError):
            status = "?"
        if status != "done":
            current = name
            break
    if current is None:
        return "all done (exiting)"
    bars = BAR.findall(stderr_text)
    if bars:
        desc, n, total = bars[-1]
        stage = desc if desc in ("sft", "rl") else "evaluate"
        if stage == current:
            return f"{stage} {n}/{total}" + (f" ({desc})" if stage == "evaluate" else "")
    if not Path(run_dir, "config.yaml").is_file():
        return "start-up"
    return f"{current} (starting)"


# --- running ----------------------------------------------------------------------------------------------------------
@dataclass
class Attempt:
    trial: int
    number: int
    signal: str | None  # KILL, TERM or None (left to finish)
    delay: float | None
    landed: str = "-"
    target: str = ""
    rc: int | None = None
    outcome: str = ""
    ok: bool = True
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Suite:
    def __init__(self, config: str, overrides: list[str], out: Path, nproc: int, grace_s: float, seed: int = 0):
        self.config, self.overrides, self.out, self.nproc, self.grace_s = config, overrides, out, nproc, grace_s
        self.rng = random.Random(seed)
        self.attempts: list[Attempt] = []
        self.findings: list[str] = []

    def command(self, run_dir: Path) -> list[str]:
        args = ["-m", "pipeline", "run", self.config, f"run.dir={run_dir}", *SHORT,
                *(MULTI if self.nproc > 1 else ()), *self.overrides, "run.progress=true",
                f"run.preempt_grace_s={self.grace_s}"]
        if self.nproc == 1:
            return [sys.executable, *args]
        # as training_scripts/launch.sh launches it: torchrun waits out the grace period before it SIGKILLs a rank
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "--shutdown-timeout", str(math.ceil(self.grace_s) + 30), *args]

    def start(self, run_dir: Path, log: Path) -> tuple[subprocess.Popen, Any, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAMPO_FAULT")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")  # noqa: SIM115
        proc = subprocess.Popen(self.command(run_dir), cwd=ROOT, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # its own process group: SIGKILL takes every child
        return proc, out, err

    def run_once(self, run_dir: Path, a: Attempt, timeout: float) -> Attempt:
        log = self.out / "logs" / f"trial{a.trial:02d}_attempt{a.number:02d}"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        proc, out, err = self.start(run_dir, log)
        try:
            if a.signal is None:
                a.rc = self._wait(proc, timeout)
            else:
                try:
                    a.rc = proc.wait(timeout=a.delay)
                    a.outcome = "finished before its kill"
                except subprocess.TimeoutExpired:
                    err.flush()
                    a.landed = where_now(run_dir, log.with_suffix(".err").read_text(errors="replace"))
                    self._send(proc, a)
                    limit = 10.0 if a.signal == "KILL" else self.grace_s + 30.0
                    a.rc = self._wait(proc, limit)
        finally:
            kill_all(proc)  # anything the run left behind (a reward worker, a rank)
            out.close()
            err.close()
        a.seconds = time.monotonic() - t0
        self._judge(a, log.with_suffix(".err").read_text(errors="replace"))
        return a

    def _wait(self, proc: subprocess.Popen, limit: float) -> int:
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_all(proc)
            proc.wait()
            return -999  # did not end in time: a hang

    def _send(self, proc: subprocess.Popen, a: Attempt) -> None:
        if a.signal == "KILL":
            a.target = "all"
            kill_all(proc)
            return
        pid, a.target = proc.pid, "process"
        if self.nproc > 1:
            ranks = ranks_of(proc.pid)
            if ranks:
                rank = self.rng.choice(sorted(ranks))
                pid, a.target = ranks[rank], f"rank {rank}"
            else:
                a.target = "torchrun"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _judge(self, a: Attempt, stderr_text: str) -> None:
        if a.rc == -999:
            a.ok, a.outcome = False, f"HUNG: still running {'10' if a.signal == 'KILL' else self.grace_s + 30:g} s " \
                                     "after the signal"
            return
        if a.outcome == "finished before its kill":
            a.ok = a.rc == 0
            if not a.ok:
                a.outcome = f"FAILED by itself (exit {a.rc}); see its log"
            return
        if a.signal is None:
            a.ok = a.rc == 0
            a.outcome = "completed" if a.ok else f"FAILED (exit {a.rc}); see its log"
            return
        if a.signal == "KILL":
            a.ok = a.rc == -signal.SIGKILL
            a.outcome = "killed" if a.ok else f"UNEXPECTED exit {a.rc} after SIGKILL"
            return
        stops = PREEMPTED.findall(stderr_text)
        grace = "no safe point was reached within" in stderr_text
        expected = EXIT_PREEMPTED if self.nproc == 1 else 1  # torchrun reports a rank that exited 75 as failed
        ranks_said = self.nproc == 1 or f"exitcode  : {EXIT_PREEMPTED}" in stderr_text
        if a.rc == expected and (stops or grace) and ranks_said:
            if stops:
                where = {f"{stage} {at}" for _, stage, at in stops}
                a.outcome = "stopped at a safe point: " + " / ".join(sorted(where))
                a.ok = len(where) == 1  # every rank stopped at the same place
                if not a.ok:
                    a.outcome = "RANKS DISAGREE: " + a.outcome
            else:
                a.outcome = "no safe point within the grace period: exited without a checkpoint"
        elif a.rc == 0:
            a.outcome = "finished (the signal came at the very end)"
        elif a.rc == -signal.SIGTERM and a.target == "torchrun":
            a.outcome = "torchrun itself got the signal (no rank was running)"
        elif a.rc == -signal.SIGTERM:
            a.outcome = "ended by the signal while Python was starting or shutting down (outside the run)"
        else:
            a.ok, a.outcome = False, f"UNEXPECTED exit {a.rc} after SIGTERM; see its log"

    def run(self, kills: int) -> bool:
        rng = self.rng
        self.out.mkdir(parents=True, exist_ok=True)
        reference = self.out / "reference"
        t0 = time.monotonic()
        ref = self.run_once(reference, Attempt(0, 0, None, None), timeout=3600)
        duration = time.monotonic() - t0
        print(f"reference run: {duration:.1f} s, exit {ref.rc}" + ("" if ref.ok else f" ({ref.outcome})"), flush=True)
        if not ref.ok:
            self.findings.append(f"the reference run failed (exit {ref.rc}); see {self.out / 'logs'}")
            return False
        self.findings += [f"reference: {p}" for p in scan(reference)]
        trial, number, done = 1, 0, 0
        while True:
            run_dir = self.out / "runs" / f"trial_{trial:02d}"
            number += 1
            if done < kills:
                sig, delay = rng.choice(("KILL", "TERM")), rng.uniform(0.0, duration)
            else:
                sig, delay = None, None
            a = self.run_once(run_dir, Attempt(trial, number, sig, delay), timeout=max(600.0, 20 * duration))
            self.attempts.append(a)
            print(f"  trial {trial} attempt {number}: {a.signal or '-'} at {fmt(a.delay)} s in {a.landed} -> exit "
                  f"{a.rc}: {a.outcome}", flush=True)
            if a.signal is not None and a.outcome != "finished before its kill":
                done += 1
                a.notes += scan(run_dir)
                self.findings += [f"after kill {done} (trial {trial}): {p}" for p in a.notes]
            if not a.ok:
                self.findings.append(f"trial {trial} attempt {number}: {a.outcome}")
            if a.rc == 0 and a.ok:
                self.findings += [f"trial {trial} (completed): {d}" for d in compare(reference, run_dir)]
                self.findings += [f"trial {trial} (completed): {p}" for p in scan(run_dir)]
                if done >= kills:
                    break
                trial, number = trial + 1, 0
            elif not a.ok and a.rc != -signal.SIGKILL and (a.signal is None or a.outcome.startswith("FAILED")):
                break  # the run fails on its own: nothing more to learn
        return not self.findings

    def report(self, ok: bool) -> str:
        rows = [("#", "trial", "try", "signal", "after s", "landed in (bar)", "sent to", "exit", "outcome")]
        k = 0
        for a in self.attempts:
            if a.signal is None or a.outcome == "finished before its kill":
                continue
            k += 1
            rows.append((str(k), str(a.trial), str(a.number), a.signal, fmt(a.delay), a.landed, a.target,
                         str(a.rc), a.outcome))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        trials = sorted({a.trial for a in self.attempts if a.rc == 0 and a.ok})
        finished_early = sum(a.outcome == "finished before its kill" for a in self.attempts)
        per_stage: dict[str, int] = {}
        for r in rows[1:]:
            stage = r[5].split(" ")[0]
            per_stage[stage] = per_stage.get(stage, 0) + 1
        lines += ["", f"{k} kills in {len(self.attempts)} attempts ({finished_early} finished before their kill), "
                      f"{len(trials)} run(s) completed and compared with the reference",
                  "kills by where they landed: " + ", ".join(f"{s} {n}" for s, n in sorted(per_stage.items()))]
        left = sorted({x for t in trials for x in leftovers(self.out / "runs" / f"trial_{t:02d}")})
        if left:
            lines.append(f"temporary files left by kills (never read; no run removes them): {', '.join(left[:5])}"
                         + (" ..." if len(left) > 5 else ""))
        if ok:
            lines.append("verdict: PASS - every completed run is identical to the uninterrupted one (every final "
                         "tensor torch.equal, the same evaluation summary), and no file was ever unreadable")
        else:
            lines += ["verdict: FAIL"] + [f"  {f}" for f in self.findings]
        return "\n".join(lines)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL an attempt as a lost node loses it: its process group and, under torchrun, each rank's own process
    group (torchrun starts every rank in a session of its own, so killing torchrun's group leaves the ranks running
    on, orphaned, into the next attempt's run folder)."""
    groups = [proc.pid, *ranks_of(proc.pid).values()]
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def ranks_of(pid: int) -> dict[int, int]:
    """torchrun's worker processes: ``{rank: pid}`` from ``/proc`` (Linux)."""
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                    rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), None)
                    if rank is not None:
                        out[int(rank)] = int(child)
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.killsuite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    ap.add_argument("overrides", nargs="*", help="key=value overrides after the built-in shortening")
    ap.add_argument("--kills", type=int, default=50, help="how many kills (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments and signals")
    ap.add_argument("--nproc", type=int, default=1, help="ranks per attempt (torchrun, gloo) (default 1)")
    ap.add_argument("--grace", type=float, default=60.0, help="run.preempt_grace_s of every attempt (default 60)")
    ap.add_argument("--out", default="runs/killsuite", help="folder for the runs and logs; must not exist or be "
                                                             "empty (default runs/killsuite)")
    args = ap.parse_args(argv)
    if args.kills < 0 or args.nproc < 1:
        ap.error("--kills must be >= 0 and --nproc >= 1")
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        ap.error(f"--out {out} is not empty: give another folder, or delete it")
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config  # the runs start in ROOT
    suite = Suite(config, args.overrides, out, args.nproc, args.grace, seed=args.seed)
    ok = suite.run(args.kills)
    print("\n" + suite.report(ok), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
