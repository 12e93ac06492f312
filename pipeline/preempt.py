"""Preemption: SIGTERM, SIGINT or SIGUSR1 stops a run at its next safe point, with a checkpoint, in bounded time.

Schedulers send SIGTERM some time before they kill a job (Slurm's ``KillWait``, Kubernetes' grace period, a spot
instance's notice), some send SIGUSR1 ahead of the deadline (Slurm's ``--signal``), Ctrl-C sends SIGINT. Each of the
three only *requests* a stop:

* :func:`install` (at the start of ``python -m pipeline run``, in the main thread) replaces their handlers with one
  that records the request. A watchdog thread, woken through :func:`signal.set_wakeup_fd` (so also while the main
  thread is blocked in a long C call: a generation, a collective), starts the grace period ``run.preempt_grace_s`` at
  the first request; if the process is still running when it expires, it exits with :data:`EXIT_PREEMPTED` at once,
  writing nothing: the previous checkpoint stays the resume point (checkpoints are atomic, see
  :mod:`pipeline.state`). Repeated signals change nothing; SIGKILL stops at once.
* The stages stop only at *safe points*, where the run's state is whole: after an SFT step, after an RL iteration's
  update (a rollout is never cut: an unfinished iteration is simply redone on resume, since its prompts and sampling
  seeds are functions of (seed, iteration)), between evaluation batches (evaluation resumes per problem), and between
  stages. There :meth:`pipeline.context.Context.preemption_point` asks :func:`agreed`, writes a checkpoint at that
  step (unless the stage just wrote one), records the preemption in the stage's state file and raises
  :class:`Preempted`, which the runner turns into a one-line message naming the stage and step and exit status
  :data:`EXIT_PREEMPTED`. Running the same command again resumes there.
* Under torchrun the signal may reach only some ranks. :func:`agreed` takes the largest request over the ranks (one
  small all-reduce per safe point; none in one process), so every rank stops at the same step. A rank that learns of
  a request this way starts its own grace period. Evaluation batches are not collective (each rollout engine works on
  its own share), so there a rank's request is also posted as a marker file in the shared run folder
  (:func:`configure`), which the other ranks see at their next batch; the ranks then agree once all have stopped.

A signal that arrives before :func:`install` (while Python starts) ends the process as it normally would; once the
run is over (:func:`finish`), the signals are ignored while Python shuts down.
"""
from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import threading
import time
from pathlib import Path

from pipeline.config import RunConfig

#: exit status of a preempted run (``EX_TEMPFAIL`` of sysexits.h: try again later; the same command resumes)
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PEER = 1 << 8  # added to a signal number learned from another rank (signal numbers are below 65)


class Preempted(Exception):
    """Raised on every rank at a safe point once the ranks agreed to stop; ``checkpoint`` is the resume point."""

    def __init__(self, stage: str, where: str, checkpoint: str | None, note: str = ""):
        self.stage, self.where, self.checkpoint, self.signal = stage, where, checkpoint, signal_name()
        if note:
            self.then = note
        elif checkpoint:
            self.then = f"checkpoint {checkpoint} written; run the same command again to resume from it"
        else:
            self.then = "run the same command again to resume"
        super().__init__(self.line())

    def line(self, who: str = "") -> str:
        """The one line the runner prints; ``who`` names the rank in a multi-rank run."""
        return f"preempted ({self.signal}) in stage {self.stage} {self.where}{who}: {self.then}"


class StopRequested(Exception):
    """Raised between evaluation batches on a rank that has a stop request, before the ranks agree."""


_installed = False
_signum: int | None = None  # the first request: a signal number, + _PEER when another rank got it
_since: float | None = None  # time.monotonic() of the first request
_grace_s = RunConfig().preempt_grace_s
_marker: Path | None = None
_marker_written = False
_prev_handlers: dict[int, object] = {}
_prev_wakeup_fd = -1
_wake_w = -1


def install(grace_s: float | None = None) -> bool:
    """Handle SIGTERM, SIGINT and SIGUSR1 as stop requests and start the watchdog thread; True when this call did
    (then :func:`uninstall` is the caller's). Idempotent (a second call only sets ``grace_s``). Outside the main
    thread, where Python cannot set signal handlers, it does nothing."""
    global _installed, _prev_handlers, _prev_wakeup_fd, _wake_w
    if _installed:
        configure(grace_s=grace_s)
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    _reset()
    configure(grace_s=grace_s)
    r, w = os.pipe()
    os.set_blocking(w, False)
    _prev_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    _wake_w = w
    _prev_handlers = {s: signal.signal(s, _handler) for s in SIGNALS}
    _installed = True
    threading.Thread(target=_watch, args=(r,), name="lampo-preempt-watchdog", daemon=True).start()
    return True


def configure(grace_s: float | None = None, marker: str | Path | None = None) -> None:
    """Set the grace period (``run.preempt_grace_s``) and, in a multi-rank run, the marker file in the shared run
    folder through which a rank's request reaches the others between evaluation batches."""
    global _grace_s, _marker
    if grace_s is not None:
        if not grace_s > 0:
            raise ValueError(f"grace period {grace_s} s must be positive")
        _grace_s = float(grace_s)
    if marker is not None:
        _marker = Path(marker)
        if _signum is not None and _signum < _PEER:
            _post_marker()
    _wake()


def uninstall() -> None:
    """Restore the previous handlers, stop the watchdog and forget any request."""
    global _installed, _wake_w
    if not _installed:
        return
    for s, h in _prev_handlers.items():
        signal.signal(s, h)
    signal.set_wakeup_fd(_prev_wakeup_fd)
    w, _wake_w = _wake_w, -1
    os.close(w)  # the watchdog reads end-of-file and ends
    _installed = False
    _reset()


def finish() -> None:
    """The run is over and its files are written (``python -m pipeline run`` calls this before Python shuts down):
    from now on the three signals are ignored, so that a late SIGTERM during the shut-down (which can take seconds)
    does not turn a finished run's exit status into "killed". A request made before keeps its grace period."""
    if _installed:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def requested() -> bool:
    """Whether this process has a stop request (its own signal, or one learned from another rank). No collective."""
    return _signum is not None


def signal_name() -> str:
    if _signum is None:
        return "no signal"
    name = signal.Signals(_signum % _PEER).name
    return f"{name} to another rank" if _signum >= _PEER else name


def agreed() -> bool:
    """Collective (every rank calls it at the same safe point): whether any rank has a stop request. One all-reduce
    of a single integer in a multi-rank run, nothing in one process."""
    from pipeline import dist

    mine = (_signum % _PEER) if _signum is not None else 0  # the marker is for between_batches only
    if dist.world_size() == 1:
        return mine > 0
    top = dist.max_over_ranks(mine)
    if top and _signum is None:
        _note(top + _PEER)
    return top > 0


def between_batches() -> None:
    """Between two evaluation batches (both written): raise :class:`StopRequested` if this rank has a request or
    another rank posted one. No collective."""
    from pipeline.faults import fault_point

    fault_point("eval_batch")
    if requested() or _marker_seen():
        raise StopRequested


# --- under torchrun --------------------------------------------------------------------------------------------------
#: torch.distributed.elastic's wait between forwarding a signal to the workers and killing them, when neither
#: ``--shutdown-timeout`` nor ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` says otherwise (torch 2.13, launcher/api.py)
TORCHRUN_DEFAULT_SHUTDOWN_S = 30
#: what torchrun forwards by default (``--signals-to-handle``); it has no handler for SIGUSR1, which ends it
TORCHRUN_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


def torchrun_shutdown_s(env: dict[str, str] | None = None, agent_argv: list[str] | None = None) -> float | None:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), the seconds its agent waits after it forwards SIGTERM, SIGINT
    (or any signal of ``--signals-to-handle``) to the workers, or after one worker failed and it stops the others,
    before it SIGKILLs them: ``--shutdown-timeout`` on the agent's command line (``/proc/<parent>/cmdline``, or
    ``agent_argv``), else ``PET_SHUTDOWN_TIMEOUT`` (torchrun's own environment spelling of the flag), else
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, else 30. None outside torchrun."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    if agent_argv is None:
        try:
            agent_argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            agent_argv = []
    # torchrun's own options: after its entry point (python -m torch.distributed.run, or the torchrun script), before
    # the worker's (``pipeline``, as in ``-m pipeline run``, or a script path)
    start = next((i + 1 for i, a in enumerate(agent_argv)
                  if a == "torch.distributed.run" or Path(a).name == "torchrun"), len(agent_argv))
    for i in range(start, len(agent_argv)):
        arg = agent_argv[i]
        if arg == "pipeline" or arg.endswith(".py"):
            break
        name, eq, value = arg.partition("=")
        if name in ("--shutdown-timeout", "--shutdown_timeout"):
            with contextlib.suppress(ValueError, IndexError):
                return float(value if eq else agent_argv[i + 1])
    for var in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        with contextlib.suppress(KeyError, ValueError):
            return float(env[var])
    return float(TORCHRUN_DEFAULT_SHUTDOWN_S)


def torchrun_warnings(grace_s: float, env: dict[str, str] | None = None,
                      agent_argv: list[str] | None = None) -> list[str]:
    """What makes a torchrun launch unfit for preemption, one line each (empty outside torchrun or when fit): an
    agent that SIGKILLs the workers before ``run.preempt_grace_s`` is over (so a stop request is cut before its safe
    point and checkpoint), and one that does not forward SIGUSR1 (which then ends torchrun and leaves the workers)."""
    env = os.environ if env is None else env
    shutdown = torchrun_shutdown_s(env, agent_argv)
    if shutdown is None:
        return []
    out = []
    if shutdown < grace_s:
        out.append(f"torchrun SIGKILLs the ranks {shutdown:g} s after it forwards a stop signal (its "
                   f"--shutdown-timeout, {TORCHRUN_DEFAULT_SHUTDOWN_S} s by default), before "
                   f"run.preempt_grace_s={grace_s:g} s is over: a preempted run may be killed before it writes its "
                   "checkpoint (it then resumes from the previous one). Launch torchrun with --shutdown-timeout "
                   f"{math.ceil(grace_s) + 30} (training_scripts/launch.sh does), or lower run.preempt_grace_s")
    handled = env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", TORCHRUN_DEFAULT_SIGNALS)
    if "SIGUSR1" not in {x.strip() for x in handled.split(",")}:
        out.append("torchrun does not forward SIGUSR1 (its --signals-to-handle): a SIGUSR1 sent to it ends it and "
                   "leaves the ranks running; add --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 if the "
                   "scheduler sends SIGUSR1 (training_scripts/launch.sh does)")
    return out


# --- internals ------------------------------------------------------------------------------------------------------
def _reset() -> None:
    global _signum, _since, _grace_s, _marker, _marker_written
    _signum = _since = _marker = None
    _marker_written = False
    _grace_s = RunConfig().preempt_grace_s


def _handler(signum: int, frame: object) -> None:
    _note(signum)


def _note(signum: int) -> None:
    """Record the first request and wake the watchdog (which starts the grace period and posts the marker)."""
    _record(signum)
    _wake()


def _record(signum: int) -> None:
    global _signum, _since
    if _signum is None:
        _since = time.monotonic()
        _signum = signum


def _wake() -> None:
    if _wake_w >= 0:
        with contextlib.suppress(OSError):  # a full pipe is awake already; a closed one has no watchdog
            os.write(_wake_w, b"\0")


def _marker_seen() -> bool:
    return _marker is not None and _marker.exists()


def _post_marker() -> None:
    global _marker_written
    if _marker is None or _marker_written:
        return
    _marker_written = True
    with contextlib.suppress(OSError):
        _marker.write_text(f"{signal_name()} {os.getpid()}\n")


def _watch(r: int) -> None:
    """The watchdog: sleeps until a signal (its number, written by the C-level handler to the wake-up pipe) or a wake
    from Python; once a request exists, posts the marker and ends the process when the grace period expires."""
    try:
        while True:
            since = _since  # read once: uninstall() may reset it meanwhile
            left = None if since is None else max(0.0, since + _grace_s - time.monotonic())
            ready, _, _ = select.select([r], [], [], left)
            if not ready and _since is not None:  # (None: uninstall() came first, the run is over)
                _expire()
            data = os.read(r, 256)
            if not data:
                return  # uninstall() closed the pipe
            for b in data:
                if b in SIGNALS:  # 0 is a wake from Python
                    _record(b)
            if _signum is not None and _signum < _PEER:
                _post_marker()
    finally:
        os.close(r)


def _expire() -> None:
    msg = (f"preempted ({signal_name()}): no safe point was reached within run.preempt_grace_s={_grace_s:g} s; "
           f"exiting without writing a checkpoint (exit status {EXIT_PREEMPTED}): the run resumes from its previous "
           "checkpoint\n")
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())
    os._exit(EXIT_PREEMPTED)
