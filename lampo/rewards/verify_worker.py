"""math-verify in a separate process with a hard time bound per comparison.

Parent side: :class:`VerifyWorker` (one shared instance per process, :func:`shared_worker`) sends
``(pred, gold, timeout_s)`` as a JSON line to a child process (:func:`main`) and waits at most
``timeout_s + KILL_GRACE_S`` for the answer line. Child side: :func:`main` parses and verifies under a float
``setitimer`` deadline (so slow sympy work is cut off without losing the warm process); if a C-level computation
ignores the signal, the parent kills the child and starts a new one for the next item. The child has an address-space
limit (``memory_limit_mb`` above its start-up size), so a huge integer raises ``MemoryError`` instead of eating the
machine, and it exits when its stdin closes (the parent died).

Why not math-verify's own ``timeout_seconds``: it uses ``signal.alarm`` (whole seconds, main thread only, and blind to
C-level work). Calls are serialised by a lock, so the worker is safe to use from any thread.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

KILL_GRACE_S = 1.0  # how long past timeout_s the parent waits before killing the child
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine can take a while


def worker_command() -> list[str]:
    """How the child is started: this file run as a script, because the child needs only the standard library and
    math-verify, not the lampo package (whose reward modules pull in rouge-score, nltk, ...).

    ``-P`` (Python 3.11+) keeps the script's own folder off ``sys.path``: without it ``lampo/rewards/`` would come
    first on the path and any module there named like a standard-library module would replace it for the child (it
    happened: a ``math.py`` here broke ``import selectors`` in every fresh virtual environment). The command names no
    relative path, so it works from any working directory.
    """
    return [sys.executable, "-P", str(Path(__file__).resolve())]


class VerifyWorker:
    """A persistent child process that runs math-verify; see the module docstring."""

    def __init__(self, memory_limit_mb: int = 2048):
        self.memory_limit_mb = memory_limit_mb
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0  # how many times a child was killed or died (for tests and logs)

    # -- process management ------------------------------------------------------------------------------------
    def _start(self) -> None:
        env = dict(os.environ)
        env["LAMPO_VERIFY_MEMORY_MB"] = str(self.memory_limit_mb)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            worker_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0,
        )
        self._buf = b""
        line = self._read_line(STARTUP_TIMEOUT_S)
        if line != "ready":
            self._kill()
            raise RuntimeError(
                f"the math-verify worker did not start (got {line!r}); see the error printed above; check "
                "that `python -c 'import math_verify'` works"
            )

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                if f is not None:
                    f.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _read_line(self, timeout: float) -> str | None:
        """One line from the child, or None on timeout / end of file."""
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    # -- the call --------------------------------------------------------------------------------------------------
    def verify(self, pred: str, gold: str, timeout_s: float) -> tuple[bool, str | None]:
        """(pred equals gold, reason when it could not be decided); returns within ``timeout_s + KILL_GRACE_S``
        once the child is running."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps([pred, gold, timeout_s]) + "\n").encode())
                line = self._read_line(timeout_s + KILL_GRACE_S)
            except BrokenPipeError:
                line = None
            if line is None:
                alive = self._proc.poll() is None
                self._kill()
                self.restarts += 1
                reason = (f"timed out after {timeout_s:g} s (worker killed and restarted)" if alive
                          else "math-verify worker crashed on this item (restarted)")
                ok, abnormal = False, True
            else:
                ok, reason, abnormal = json.loads(line)
        if abnormal:  # a timeout or crash is worth a warning; a wrong or unparsable answer is not
            log.warning("answer %r vs gold %r scored 0: %s", pred[:100], gold[:100], reason)
        return bool(ok), reason


_SHARED: VerifyWorker | None = None
_SHARED_PID = -1
_SHARED_LOCK = threading.Lock()


def shared_worker() -> VerifyWorker:
    """The process-wide worker, started lazily on first use and stopped at interpreter exit.

    A forked process (a data-loader worker, say) gets its own: it must not talk over its parent's pipes.
    """
    global _SHARED, _SHARED_PID
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED_PID != os.getpid():
            _SHARED, _SHARED_PID = VerifyWorker(), os.getpid()
            atexit.register(_SHARED.close)
        return _SHARED


def _after_fork_in_child() -> None:
    global _SHARED, _SHARED_LOCK
    _SHARED, _SHARED_LOCK = None, threading.Lock()  # the parent's lock may have been held at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------------------------------------- child process


class _Deadline(BaseException):
    """Raised by the interval timer; a BaseException so math-verify's and sympy's ``except Exception`` let it pass."""


def _limit_memory(extra_mb: int) -> None:
    import resource

    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vm_bytes + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> None:
    import logging
    import signal
    from functools import lru_cache

    # Stop requests are the parent's to handle (it closes us, or dies and our stdin ends): a scheduler's SIGTERM or
    # SIGUSR1 reaches the whole process group (torchrun's agent forwards them with killpg, Slurm signals every process
    # of the job, Ctrl-C sends SIGINT to the foreground group), and a child that died of it would score the item under
    # way 0 and fail to restart while the run finishes its step for the preemption checkpoint.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    logging.basicConfig(level=logging.ERROR)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # we bound time ourselves; silence its "timeout off" note

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    @lru_cache(maxsize=4096)
    def parsed(s: str) -> list:
        return parse("\\boxed{" + s + "}", extraction_config=config, parsing_timeout=None)

    def check(pred: str, gold: str) -> tuple[bool, str | None]:
        g = parsed(gold)
        if not g:
            return False, f"gold answer {gold[:80]!r} did not parse"
        p = parsed(pred)
        if not p or all(isinstance(x, str) for x in p):
            return False, f"answer {pred[:80]!r} did not parse as mathematics"
        # allow_set_relation_comp: "x > 2" answers the interval "(2, \infty)" (math-verify only allows the reverse)
        return bool(verify(g, p, timeout_seconds=None, allow_set_relation_comp=True)), None

    def on_alarm(signum, frame):
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    if os.name == "posix" and os.path.exists("/proc/self/statm"):
        _limit_memory(int(os.environ.get("LAMPO_VERIFY_MEMORY_MB", "2048")))
    check("\\frac{1}{2}", "0.5")  # builds the LaTeX grammar now, so the first item's time bound is honest
    out.write("ready\n")
    for line in sys.stdin:
        pred, gold, timeout_s = json.loads(line)
        try:
            signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
            try:
                result = check(pred, gold)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            result = (*result, False)
        except _Deadline:
            result = (False, f"timed out after {timeout_s:g} s", True)
        except MemoryError:
            result = (False, "ran out of memory (the worker's address-space limit)", True)
        except RecursionError:
            result = (False, "nested too deeply to parse", True)
        except Exception as e:  # noqa: BLE001 - any library failure on one item scores that item 0
            result = (False, f"math-verify failed: {type(e).__name__}: {str(e)[:120]}", True)
        out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
