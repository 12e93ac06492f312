"""The runner: read one config, run the stages in order, skip finished ones, resume an unfinished one.

    python -m pipeline run CONFIG [key=value ...] [--from-stage NAME] [--force]

Running the same command again continues where a killed run stopped. A run folder started with a different config is
refused with the difference shown, unless ``--force``.

SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stop the run at its next safe point (after an SFT step, after an RL iteration's
update, between evaluation batches) with a checkpoint, within ``run.preempt_grace_s`` seconds, or at once without one
when no safe point comes in time (:mod:`pipeline.preempt`); under torchrun every rank stops at the same step.

Exit status: 0 when every stage is done; 2 for a config or run-folder error, or a stage stopped by
``run.max_nonfinite_in_a_row`` non-finite optimizer steps in a row (one line on stderr); ``EXIT_PREEMPTED``
(75, ``EX_TEMPFAIL``: try again later) when the run was preempted, with one line on stderr naming the stage and step
and the checkpoint written; ``EXIT_LOST_RANK`` (3) on a rank whose collective failed because another rank died or
hung (within ``run.collective_timeout_min``), with one line on stderr. Under torchrun each rank exits with these
statuses, and torchrun itself reports a rank that exited with 75 as failed (its own status is 1).
"""
from __future__ import annotations

import argparse
import re
import socket
import sys
import uuid

import torch
import yaml

from lampo.files import atomic_write_text
from lampo.seeds import derive_seed
from pipeline import dist, preempt
from pipeline.checks import PipelineError
from pipeline.config import Config, ConfigError, config_diff, load_config, migrate
from pipeline.context import Context
from pipeline.logger import Logger
from pipeline.plan import add_plan_arguments, plan_command
from pipeline.stages import stage_fn
from pipeline.state import RunDir
from pipeline.validate import validate_cluster, validate_names

#: exit status of a rank that stopped because another rank died or hung (a collective failed or timed out)
EXIT_LOST_RANK = 3

# where a rank posts its stop request for the others (shared run folder; see pipeline.preempt)
PREEMPT_MARKER = ".preempt_requested"

# fields that may change between a run and its resumption without changing what it computes
RUN_CONTROL = ("run.progress", "run.threads", "run.stages", "run.collective_timeout_min", "run.keep_last_checkpoints",
               "run.preempt_grace_s", "run.max_nonfinite_in_a_row", "eval.", "rl.eval_every", "rl.log_samples",
               "rl.checkpoint_every", "sft.checkpoint_every", "sft.log_every")


def with_defaults(saved: dict, defaults: dict) -> dict:
    """A saved config read against today's schema: a field added after the run started counts as its default (which
    keeps the behaviour the run had), so upgrading the code does not lock a run folder."""
    out = dict(defaults)
    for key, value in saved.items():
        nested = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        out[key] = with_defaults(value, defaults[key]) if nested else value
    return out


def check_same_config(rd: RunDir, cfg: Config, force: bool) -> None:
    saved = rd.path("config.yaml")
    if not saved.exists():
        return
    old = with_defaults(migrate(yaml.safe_load(saved.read_text()) or {}), Config().to_dict())  # fields renamed since
    diff = [d for d in config_diff(old, cfg.to_dict()) if not d.startswith(RUN_CONTROL)]
    if diff and not force:
        raise PipelineError(f"run folder {rd.root} was started with a different config:\n  " + "\n  ".join(diff)
                            + "\nuse another run.dir, or --force to continue with the new config")


def quiet_libraries() -> None:
    """Our own progress bars and log lines say what happens; silence the libraries' per-load bars."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def check_shared_run_dir(rd: RunDir) -> None:
    """Every rank must see the run folder that rank 0 writes: checkpoints are written by several ranks and read back,
    and each rollout engine writes its evaluation share there for rank 0 to assemble. Rank 0 writes a fresh token;
    every rank reads it back."""
    if dist.world_size() == 1:
        return
    token = dist.broadcast(uuid.uuid4().hex if dist.is_main() else None)
    probe = rd.path(".shared_run_dir")
    if dist.is_main():
        atomic_write_text(probe, token)
    dist.barrier()
    seen = probe.read_text() if probe.is_file() else None
    blind = [(r, host) for r, (ok, host) in enumerate(dist.all_gather((seen == token, socket.gethostname()))) if not ok]
    if blind:
        raise PipelineError(f"run.dir={rd.root} is not the same folder on every rank: rank(s) "
                            f"{', '.join(f'{r} on {h}' for r, h in blind)} do not see what rank 0 wrote there; put "
                            "run.dir on a file system that every node mounts at the same path (NFS, Lustre, ...)")


def run(config: str | None, overrides: list[str], from_stage: str | None = None, force: bool = False) -> Context:
    """Run (or resume) the stages of a config. Raises :class:`~pipeline.preempt.Preempted` when a signal stopped it
    at a safe point (see the module docstring)."""
    mine = preempt.install()  # False from the command line: pipeline.cli installs it before the imports
    try:
        return _run(config, overrides, from_stage, force)
    finally:
        if mine:
            preempt.uninstall()


def _run(config: str | None, overrides: list[str], from_stage: str | None, force: bool) -> Context:
    quiet_libraries()
    cfg = validate_names(load_config(config, overrides))  # names against the registries, the backend's layout rules
    preempt.configure(grace_s=cfg.run.preempt_grace_s)
    if dist.is_main():
        for line in preempt.torchrun_warnings(cfg.run.preempt_grace_s):
            print(f"WARNING: {line}", file=sys.stderr, flush=True)
    dist.init(cfg.run.collective_timeout_min)  # every process group of the run gets this collective timeout
    validate_cluster(cfg)  # what needs the model's config.json: context, TP/PP vs heads and layers, GPU memory
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    rd = RunDir(cfg.run.dir)
    if dist.is_main():
        check_same_config(rd, cfg, force)
        rd.root.mkdir(parents=True, exist_ok=True)
        rd.clean_partial()
        rd.path(PREEMPT_MARKER).unlink(missing_ok=True)  # a request of an earlier run
        atomic_write_text(rd.path("config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.barrier()
    check_shared_run_dir(rd)
    if dist.world_size() > 1:
        preempt.configure(marker=rd.path(PREEMPT_MARKER))
    stages = cfg.run.stages
    if from_stage is not None:
        if from_stage not in stages:
            raise ConfigError(f"--from-stage {from_stage!r} is not one of run.stages={stages}")
        if dist.is_main():
            for name in stages[stages.index(from_stage):]:
                rd.reset_stage(name)
        dist.barrier()
    ctx = Context(cfg, rd, Logger(rd.tensorboard))
    try:
        # resolve the base model and tokenizer on every rank now: creating the tiny model is collective
        ctx.tokenizer  # noqa: B018 - a cached property, read for its effect
        for name in stages:
            if rd.state(name).status == "done":
                ctx.log.print(f"[{name}] already done, skipping")
                continue
            if preempt.agreed():  # a safe point: the stages before are done, this one has not started
                raise preempt.Preempted(name, "before it started", None)
            torch.manual_seed(derive_seed(cfg.run.seed, "init"))
            stage_fn(name)(ctx)
            dist.barrier()  # the main rank has written this stage's state: every rank reads it before going on
    finally:
        ctx.log.close()
    return ctx


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.iterations=10")
    p.add_argument("--from-stage", help="rerun from this stage on (its state and later ones are reset)")
    p.add_argument("--force", action="store_true", help="continue a run folder even though the config changed")


# how gloo and NCCL word a failed collective (torch raises them as RuntimeError, newer releases as DistError): the peer
# closed the connection (its process died) or the wait passed the process group's timeout (it hangs or is gone)
LOST_PEER = re.compile(r"gloo|nccl|connection (closed|reset) by peer|timed out waiting|watchdog", re.IGNORECASE)


def lost_rank(e: BaseException) -> bool:
    """Whether ``e``, raised in a multi-rank run, is a collective that failed because another rank died or hung."""
    return dist.world_size() > 1 and (isinstance(e, torch.distributed.DistError)
                                      or (isinstance(e, RuntimeError) and bool(LOST_PEER.search(str(e)))))


def run_command(args: argparse.Namespace) -> int:
    try:
        run(args.config, args.overrides, args.from_stage, args.force)
    except preempt.Preempted as e:
        who = f" [rank {dist.rank()} of {dist.world_size()}]" if dist.world_size() > 1 else ""
        print(e.line(who), file=sys.stderr, flush=True)
        return preempt.EXIT_PREEMPTED
    except (ConfigError, PipelineError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not lost_rank(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: [rank {dist.rank()} of {dist.world_size()}] a collective operation failed: another rank died "
              f"or hangs (see its log), and this one stops rather than wait for it. Every checkpoint written is "
              f"complete: run the same command again to resume from the newest. The failure: {first}",
              file=sys.stderr, flush=True)
        return EXIT_LOST_RANK
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline run ...`` (through :mod:`pipeline.cli`, as the ``lampo`` console command is)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_run_arguments(sub.add_parser("run", help="run (or resume) the stages of a config"))
    add_plan_arguments(sub.add_parser("plan", help="print the process layout and per-GPU memory of a config on a "
                                                   "cluster, without a GPU (see pipeline/plan.py)"))
    args = ap.parse_args(argv)
    return plan_command(args) if args.cmd == "plan" else run_command(args)


def run_main(argv: list[str] | None = None) -> int:
    """The ``lampo-run CONFIG [key=value ...]`` console command: ``python -m pipeline run`` under a short name."""
    ap = argparse.ArgumentParser(prog="lampo-run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    return run_command(ap.parse_args(argv))
