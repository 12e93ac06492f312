"""The command-line entry points: ``python -m pipeline`` and the console commands ``lampo`` and ``lampo-run``
(pyproject.toml ``[project.scripts]``).

For a run, each installs the preemption handlers (:func:`pipeline.preempt.install`) before it imports the runner and
with it torch, transformers and the backends (seconds of start-up), so that a SIGTERM, SIGINT or SIGUSR1 during those
imports is a stop request like any other (the run stops at its first safe point with exit status 75) rather than the
end of the process; once the run is over (:func:`pipeline.preempt.finish`), a late signal while Python shuts down
changes nothing. This module imports nothing heavy.
"""
from __future__ import annotations

import sys

from pipeline import preempt


def _run(entry: str, argv: list[str] | None) -> int:
    mine = preempt.install()  # before the heavy imports below
    try:
        from pipeline import runner

        return getattr(runner, entry)(argv)
    finally:
        if mine:
            preempt.finish()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline {run,plan} ...`` and ``lampo {run,plan} ...``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["run"]:
        from pipeline.runner import main as runner_main

        return runner_main(argv)
    return _run("main", argv)


def run_main(argv: list[str] | None = None) -> int:
    """``lampo-run CONFIG [key=value ...]``: ``python -m pipeline run`` under a short name."""
    return _run("run_main", argv)
