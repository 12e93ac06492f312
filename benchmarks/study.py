"""The LamPO-vs-GRPO study: one SFT checkpoint, then every arm's RL run for every seed, evaluated and compared.

    python -m benchmarks.study CONFIG [key=value ...] --arms lampo,grpo,rloo,lampo_pref,sft_control --seeds 5 \\
        [--out runs/study] [--workers 2] [--launcher "bash training_scripts/launch.sh"]

What it does, in order (every step resumes: run the same command again after a kill):

1. ``<out>/study.json`` fixes the design before any result exists: the config and overrides, each arm's overrides,
   the seeds and the evaluation settings. A later invocation may add arms or seeds; it refuses to change what an
   existing arm, the config or the evaluation means (that would mix two designs in one report).
2. ``<out>/sft``: the config's SFT stage, once, with the config's own seed. Every arm starts from its ``sft/final``.
3. ``<out>/runs/<arm>/seed_<s>``: one pipeline run per (arm, seed), ``run.seed=s``. RL arms run the RL stage from the
   shared checkpoint and evaluate the policy every ``--curve-every`` iterations on the first ``--curve-limit`` held-out
   problems (the learning curves); the SFT-control arm instead continues SFT for as many optimizer steps as an RL arm
   takes. Runs are ordered seed by seed, so a study stopped early holds whole seeds (every arm) first.
4. Each finished run's final checkpoint is evaluated on the first ``--eval-limit`` held-out problems, greedy, and on the
   first ``--sample-limit`` with ``--sample-k`` samples at the rollout temperature (avg@k, pass@k). The sampling seed
   is the run's seed, so arms with the same seed see the same RL prompt order, sampling seeds and evaluation seeds.
5. ``<out>/report.md``, ``<out>/results.json`` and ``<out>/plots/*.png``: per-arm means with 95% confidence intervals
   over seeds (Student t), paired differences against the reference arm (GRPO), learning curves, training-stability
   figures and LamPO's pairwise statistics (:mod:`benchmarks.study_report`).

Arms are config overrides (:data:`ARMS`), so any estimator, loss or reward combination is an arm; ``--arm
NAME=key=value,key=value`` adds one on the command line. Every arm inherits the config's recipe (for
``configs/tiny.yaml``: clip 0.2 / 0.28, token-mean loss, ROUGE-L reward with alpha 1.0) and changes only what its
overrides say.

Each run is a child process (``--launcher``, default ``python -m pipeline run``; on GPU nodes
``bash training_scripts/launch.sh`` runs it under torchrun). Children die with the study (``PR_SET_PDEATHSIG``), so a
killed study leaves no orphan writing into a run folder; a lock file refuses a second study on the same folder.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lampo.files import atomic_write_json

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Arm:
    overrides: tuple[str, ...]
    about: str
    kind: str = "rl"  # rl | sft (the SFT-control arm)


ARMS: dict[str, Arm] = {
    "lampo": Arm(("rl.algorithm.advantage=lampo",),
                 "LamPO, confidence-weighted pairs (the project's formulation), tau=1"),
    "grpo": Arm(("rl.algorithm.advantage=grpo",), "GRPO: reward minus group mean, over the group's std"),
    "dr_grpo": Arm(("rl.algorithm.advantage=dr_grpo",), "Dr. GRPO: reward minus group mean, no std"),
    "rloo": Arm(("rl.algorithm.advantage=rloo",), "RLOO: reward minus the mean of the others (= LamPO, tau=inf)"),
    "lampo_pref": Arm(("rl.algorithm.advantage=lampo", "rl.algorithm.lampo_weight=preference"),
                      "LamPO, preference-weighted average over pairs, sigma((s_i-s_j)/tau), tau=1"),
    "lampo_nodense": Arm(("rl.algorithm.advantage=lampo", "rl.reward.dense=null"),
                         "LamPO without the dense (ROUGE-L) reward: outcome reward only"),
    "grpo_nodense": Arm(("rl.algorithm.advantage=grpo", "rl.reward.dense=null"),
                        "GRPO without the dense reward: outcome reward only"),
    "grpo_symclip": Arm(("rl.algorithm.advantage=grpo", "rl.algorithm.clip_high=0.2"),
                        "GRPO with symmetric clipping 0.2/0.2 (without DAPO's clip-higher)"),
    "grpo_dynamic": Arm(("rl.algorithm.advantage=grpo", "rl.algorithm.dynamic_sampling=true"),
                        "GRPO + DAPO's dynamic sampling (groups with equal rewards dropped)"),
    "gspo": Arm(("rl.algorithm.advantage=grpo", "rl.algorithm.policy_loss=gspo", "rl.algorithm.clip_low=0.0003",
                 "rl.algorithm.clip_high=0.0004"),
                "GSPO: GRPO advantages, sequence-level ratio, the GSPO paper's clip range 3e-4 / 4e-4"),
    # exploratory, added after the core result showed |s_i - s_j| ~ 0.05 with length-normalised scores, so that tau=1
    # weights all stay within 0.49-0.51 (LamPO ~ RLOO): with summed scores the gaps are ~25x larger (docs/study.md)
    "lampo_sum": Arm(("rl.algorithm.advantage=lampo", "rl.algorithm.length_normalized_score=false"),
                     "LamPO with summed (not length-normalised) sequence scores: pair weights away from 1/2"),
    "lampo_tau0.25": Arm(("rl.algorithm.advantage=lampo", "rl.algorithm.lampo_temperature=0.25"),
                         "LamPO, confidence weights, tau=0.25"),
    "lampo_tau4": Arm(("rl.algorithm.advantage=lampo", "rl.algorithm.lampo_temperature=4.0"),
                      "LamPO, confidence weights, tau=4"),
    "lampo_pref_tau0.25": Arm(("rl.algorithm.advantage=lampo", "rl.algorithm.lampo_weight=preference",
                               "rl.algorithm.lampo_temperature=0.25"), "LamPO, preference weights, tau=0.25"),
    "lampo_pref_tau4": Arm(("rl.algorithm.advantage=lampo", "rl.algorithm.lampo_weight=preference",
                            "rl.algorithm.lampo_temperature=4.0"), "LamPO, preference weights, tau=4"),
    "sft_control": Arm((), "more SFT instead of RL: as many optimizer steps as an RL arm, from the same checkpoint, "
                           "at the learning rate where the SFT schedule ended", kind="sft"),
}
# named sets for --arms
ARM_SETS = {
    "core": ["lampo", "grpo", "rloo", "lampo_pref", "sft_control"],
    "estimators": ["lampo", "grpo", "dr_grpo", "rloo", "lampo_pref"],
    "reward": ["lampo", "grpo", "lampo_nodense", "grpo_nodense"],
    "dapo_gspo": ["grpo", "grpo_symclip", "grpo_dynamic", "gspo"],
    "tau": ["lampo", "lampo_tau0.25", "lampo_tau4", "lampo_pref", "lampo_pref_tau0.25", "lampo_pref_tau4", "rloo"],
}
ARM_SETS["all"] = list(ARMS)
REFERENCE_ARM = "grpo"


class StudyError(RuntimeError):
    """A study cannot go on; the message says what to change."""


# --------------------------------------------------------------------------------------------------------------------
# the design


def parse_arms(spec: str, extra: list[str]) -> dict[str, Arm]:
    """``--arms`` (names and set names, comma-separated) plus ``--arm NAME=k=v,k=v`` -> {name: Arm} in order."""
    arms: dict[str, Arm] = {}
    for item in extra:
        name, sep, body = item.partition("=")
        if not sep or not name or not body:
            raise StudyError(f"--arm {item!r}: write NAME=key=value[,key=value...]")
        if name in ARMS:
            raise StudyError(f"--arm {name!r}: that name is a built-in arm; pick another name for a custom one")
        arms[name] = Arm(tuple(s for s in body.split(",") if s), "custom arm: " + body)
    names: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if tok:
            names += ARM_SETS.get(tok, [tok])
    unknown = [n for n in names if n not in ARMS and n not in arms]
    if unknown:
        raise StudyError(f"unknown arm(s) {', '.join(unknown)}; built-in arms: {', '.join(ARMS)}; sets: "
                         f"{', '.join(ARM_SETS)}; or define one with --arm NAME=key=value,...")
    out = {n: ARMS.get(n) or arms[n] for n in dict.fromkeys(names)}  # in the order given
    out.update((n, a) for n, a in arms.items() if n not in out)  # custom arms not named in --arms come last
    return out


def parse_seeds(spec: str, base: int) -> list[int]:
    """``5`` -> five seeds starting at the config's ``run.seed``; ``1,7,9`` -> exactly those."""
    try:
        seeds = [int(s) for s in spec.split(",") if s.strip()] if "," in spec else [base + i for i in range(int(spec))]
    except ValueError:
        raise StudyError(f"--seeds {spec!r}: give a count (5) or a comma-separated list (1,2,3)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"--seeds {spec!r}: need at least one seed, no repeats")
    return seeds


def rl_optimizer_steps(cfg: Any) -> int:
    """Optimizer steps of one RL run of ``cfg``: iterations x epochs x mini-batches per iteration."""
    seqs = cfg.rl.prompts_per_iteration * cfg.rollout.n_samples
    return cfg.rl.iterations * cfg.rl.algorithm.ppo_epochs * -(-seqs // cfg.rl.mini_batch_size)


@dataclasses.dataclass
class Study:
    """The fixed design of one study folder (``study.json``) and the commands it runs."""

    out: Path
    config: str
    overrides: list[str]
    arms: dict[str, Arm]
    seeds: list[int]
    evaluation: dict[str, Any]
    launcher: list[str]
    python: list[str] = dataclasses.field(default_factory=lambda: [sys.executable])

    # ---- the design file
    def design(self) -> dict[str, Any]:
        return {"config": self.config, "overrides": self.overrides, "evaluation": self.evaluation,
                "arms": {n: {"overrides": list(a.overrides), "kind": a.kind, "about": a.about}
                         for n, a in self.arms.items()},
                "seeds": self.seeds, "reference_arm": REFERENCE_ARM}

    def fix_design(self) -> None:
        """Write ``study.json`` the first time; afterwards allow only added arms or seeds."""
        path = self.out / "study.json"
        new = self.design()
        if path.exists():
            old = json.loads(path.read_text())
            changed = [k for k in ("config", "overrides", "evaluation") if old[k] != new[k]]
            changed += [f"arm {n}" for n, a in new["arms"].items()
                        if n in old["arms"] and old["arms"][n]["overrides"] != a["overrides"]]
            if changed:
                raise StudyError(f"{self.out} holds a study with a different design ({', '.join(changed)}); the "
                                 "design is fixed before results exist. Use another --out, or the recorded "
                                 f"settings (see {path})")
            merged = {**old, "arms": {**old["arms"], **new["arms"]},
                      "seeds": old["seeds"] + [s for s in new["seeds"] if s not in old["seeds"]]}
            new = merged
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, new, ensure_ascii=True)

    # ---- folders
    @property
    def sft_dir(self) -> Path:
        return self.out / "sft"

    @property
    def sft_checkpoint(self) -> Path:
        return self.sft_dir / "sft" / "final"

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / arm / f"seed_{seed}"

    # ---- commands
    def sft_command(self) -> list[str]:
        return [*self.launcher, self.config, *self.overrides, f"run.dir={self.sft_dir}", "run.stages=[sft]"]

    def run_command(self, arm: str, seed: int, cfg: Any) -> list[str]:
        a, ev = self.arms[arm], self.evaluation
        common = [f"run.dir={self.run_dir(arm, seed)}", f"run.seed={seed}", f"model.path={self.sft_checkpoint}"]
        if a.kind == "sft":
            s = cfg.sft
            stage = ["run.stages=[sft]", f"sft.steps={rl_optimizer_steps(cfg)}", f"sft.lr={s.lr * s.min_lr_ratio!r}",
                     "sft.warmup_steps=0", "sft.min_lr_ratio=1.0"]
        else:
            stage = ["run.stages=[rl]", f"rl.eval_every={ev['curve_every']}", f"eval.limit={ev['curve_limit']}",
                     "eval.samples=1", "eval.temperature=0.0"]
        return [*self.launcher, self.config, *self.overrides, *a.overrides, *common, *stage]

    def eval_command(self, model: Path, out: Path, seed: int, sampled: bool) -> list[str]:
        ev = self.evaluation
        k, limit, temp = (ev["sample_k"], ev["sample_limit"], ev["sample_temperature"]) if sampled else \
            (1, ev["eval_limit"], 0.0)
        return [*self.python, "-m", "evaluation", "--model", str(model), "--benchmarks", ",".join(ev["benchmarks"]),
                "--samples", str(k), "--temperature", repr(temp), "--limit", str(limit), "--max-new-tokens",
                str(ev["max_new_tokens"]), "--seed", str(seed), "--out", str(out), "--batch-size",
                str(max(1, ev["batch_size"] // k)), "--engine", ev["engine"], "--no-progress", "--config", self.config,
                *(["--data-dir", ev["data_dir"]] if ev.get("data_dir") else []), *self.overrides]


# --------------------------------------------------------------------------------------------------------------------
# running children


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the thread that started it ends, so a killed study leaves no orphan."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


class Runner:
    """Runs the study's child processes, logging each command and its output to ``<out>/logs``."""

    def __init__(self, out: Path, threads: int | None, verbose: bool):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.threads, self.verbose, self.lock = threads, verbose, threading.Lock()

    def say(self, msg: str) -> None:
        with self.lock:
            print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def __call__(self, cmd: list[str], name: str) -> float:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log = self.logs / f"{name}.log"
        t = time.perf_counter()
        with open(log, "a") as fh:
            fh.write(f"\n$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  preexec_fn=_die_with_parent)
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise StudyError(f"{name} failed (exit {proc.returncode}); its log is {log}; last lines:\n{tail}\n"
                             "fix the cause and run the same study command again: finished work is kept")
        return time.perf_counter() - t


def _stage_done(run_dir: Path, stage: str) -> bool:
    p = run_dir / "state" / f"{stage}.json"
    return p.is_file() and json.loads(p.read_text()).get("status") == "done"


def _eval_done(out: Path) -> bool:
    return (out / "results.json").is_file()


def run_one(study: Study, runner: Runner, arm: str, seed: int, cfg: Any) -> None:
    """One (arm, seed): train (or resume), then the two final evaluations; skips whatever is finished."""
    d, kind, name = study.run_dir(arm, seed), study.arms[arm].kind, f"{arm}.seed_{seed}"
    stage = "sft" if kind == "sft" else "rl"
    if not _stage_done(d, stage):
        runner.say(f"{name}: training")
        runner(study.run_command(arm, seed, cfg), name)
    final = d / stage / "final"
    for sampled, sub in ((False, "greedy"), (True, "sampled")):
        out = d / "final_eval" / sub
        if not _eval_done(out):
            runner(study.eval_command(final, out, seed, sampled), f"{name}.eval_{sub}")
    runner.say(f"{name}: done")


def run_study(study: Study, workers: int, runner: Runner, cfg: Any) -> None:
    study.fix_design()
    if not _stage_done(study.sft_dir, "sft"):
        runner.say("shared SFT checkpoint: training")
        runner(study.sft_command(), "sft")
    base_eval = study.out / "sft_eval"
    for sampled, sub in ((False, "greedy"), (True, "sampled")):
        if not _eval_done(base_eval / sub):
            runner(study.eval_command(study.sft_checkpoint, base_eval / sub, study.seeds[0], sampled),
                   f"sft.eval_{sub}")
    jobs = [(arm, seed) for seed in study.seeds for arm in study.arms]
    runner.say(f"{len(jobs)} runs ({len(study.arms)} arms x {len(study.seeds)} seeds), {workers} at a time")
    if workers == 1:
        for arm, seed in jobs:
            run_one(study, runner, arm, seed, cfg)
        return
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_one, study, runner, arm, seed, cfg) for arm, seed in jobs]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="pipeline YAML (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every run")
    p.add_argument("--arms", default="core", help=f"arms and arm sets, comma-separated; sets: {', '.join(ARM_SETS)}")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=k=v,k=v", help="a custom arm")
    p.add_argument("--seeds", default="5", help="a count (from the config's run.seed) or a list 1,2,3")
    p.add_argument("--out", default=None, help="study folder (default runs/study/<config name>)")
    p.add_argument("--workers", type=int, default=1, help="runs at once (CPU: one per core with run.threads=1)")
    p.add_argument("--launcher", default=None,
                   help="command that runs one pipeline config (default: python -m pipeline run; GPU nodes: "
                        "'bash training_scripts/launch.sh')")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each child (0: leave unset)")
    p.add_argument("--eval-limit", type=int, default=4000, help="held-out problems for the final greedy evaluation")
    p.add_argument("--sample-limit", type=int, default=1000, help="held-out problems for sampled avg@k / pass@k")
    p.add_argument("--sample-k", type=int, default=8, help="samples per problem for avg@k / pass@k")
    p.add_argument("--sample-temperature", type=float, default=None, help="default: the config's rollout temperature")
    p.add_argument("--curve-limit", type=int, default=400, help="held-out problems for the learning curves")
    p.add_argument("--curve-every", type=int, default=None, help="iterations between curve points (default: 1/8)")
    p.add_argument("--report-only", action="store_true", help="write the report from what has finished, run nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="print every command and write nothing; with a launcher script (launch.sh), also run the SFT "
                        "and one RL command under DRY_RUN=1, which prints their layout and memory plan")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Study, Any]:
    sys.path.insert(0, str(REPO))
    from pipeline.config import ConfigError, load_config
    from pipeline.validate import validate_names

    try:
        cfg = validate_names(load_config(args.config, args.overrides))
    except ConfigError as e:
        raise StudyError(f"{args.config}: {e}") from None
    if "rl" not in cfg.run.stages and "sft" not in cfg.run.stages:
        raise StudyError(f"{args.config} runs neither sft nor rl (run.stages={cfg.run.stages})")
    arms = parse_arms(args.arms, args.arm)
    for name, arm in arms.items():  # every arm must be a valid config before anything runs
        try:
            validate_names(load_config(args.config, [*args.overrides, *arm.overrides]))
        except ConfigError as e:
            raise StudyError(f"arm {name} ({' '.join(arm.overrides)}): {e}") from None
    for flag in ("eval_limit", "sample_limit", "sample_k", "curve_limit"):
        if getattr(args, flag) < 1:
            raise StudyError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    if args.workers < 1:
        raise StudyError(f"--workers={args.workers} must be >= 1")
    curve_every = args.curve_every or max(1, cfg.rl.iterations // 8)
    evaluation = {"benchmarks": list(cfg.eval.benchmarks), "eval_limit": args.eval_limit,
                  "sample_limit": args.sample_limit, "sample_k": args.sample_k,
                  "sample_temperature": args.sample_temperature if args.sample_temperature is not None
                  else cfg.rollout.temperature,
                  "max_new_tokens": cfg.eval.max_new_tokens, "curve_limit": min(args.curve_limit, args.eval_limit),
                  "curve_every": curve_every, "engine": cfg.rollout.engine, "data_dir": cfg.eval.data_dir,
                  "batch_size": cfg.rollout.batch_size}  # sequences per engine call
    out = Path(args.out or f"runs/study/{Path(args.config).stem}").resolve()
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable, "-m", "pipeline", "run"]
    study = Study(out=out, config=str(Path(args.config).resolve()), overrides=list(args.overrides), arms=arms,
                  seeds=parse_seeds(args.seeds, cfg.run.seed), evaluation=evaluation, launcher=launcher)
    return study, cfg


def dry_run(study: Study, cfg: Any) -> int:
    """Print what the study would run; with a launcher script, have it check the layouts (``DRY_RUN=1``)."""
    print(f"study folder {study.out}; {len(study.arms)} arms x {len(study.seeds)} seeds")
    print("$ " + shlex.join(study.sft_command()))
    seed = study.seeds[0]
    print("$ " + shlex.join(study.eval_command(study.sft_checkpoint, study.out / "sft_eval" / "greedy", seed, False)))
    for seed in study.seeds:
        for arm in study.arms:
            print("$ " + shlex.join(study.run_command(arm, seed, cfg)))
    final = study.run_dir(next(iter(study.arms)), seed) / "rl" / "final"
    for sampled in (False, True):
        print("$ " + shlex.join(study.eval_command(final, final.parent.parent / "final_eval", seed, sampled)))
    if not study.launcher[-1].endswith(".sh"):
        return 0
    rl_arm = next((a for a, spec in study.arms.items() if spec.kind == "rl"), None)
    # the RL run starts from the SFT checkpoint, which does not exist yet: plan it on the config's own model, which
    # has the same architecture
    checks = [study.sft_command()] + ([[a for a in study.run_command(rl_arm, study.seeds[0], cfg)
                                        if not a.startswith("model.path=")]] if rl_arm else [])
    for cmd in checks:
        print(f"\n$ DRY_RUN=1 {shlex.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DRY_RUN="1")).returncode
        if rc != 0:
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.study_report import write_report

    try:
        study, cfg = build(args)
        if args.dry_run:
            return dry_run(study, cfg)
        study.out.mkdir(parents=True, exist_ok=True)
        with open(study.out / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StudyError(f"another study is running in {study.out}; wait for it or stop it first") from None
            runner = Runner(study.out, args.threads or None, args.verbose)
            t = time.perf_counter()
            if not args.report_only:
                run_study(study, args.workers, runner, cfg)
            report = write_report(study.out)
            runner.say(f"report: {report} ({time.perf_counter() - t:.0f} s this invocation)")
    except StudyError as e:
        print(f"study: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
