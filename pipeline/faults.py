"""Fault injection for the kill-and-resume tests: ``LAMPO_FAULT=POINT[:N[:SIGNAL]]`` sends SIGNAL to the process itself
the N-th time (default 1st) execution reaches ``fault_point(POINT)``. SIGNAL is ``KILL`` (the default: the process dies
on the spot), ``TERM``, ``INT``, ``USR1`` (a preemption request: :mod:`pipeline.preempt` stops the run at its next
safe point; execution goes on from the fault point until then) or ``STOP`` (the process freezes there: a hung rank,
which the others must give up on within the collective timeout; the test SIGKILLs it afterwards). With
``LAMPO_FAULT_RANK=R`` only the process of rank R (torchrun's ``RANK``) is signalled.
Unset (always, outside tests), it costs one dict lookup.

Points: ``sft_step`` (before an SFT step), ``rl_rollout`` (after an RL rollout's generation, before scoring),
``rl_update`` (before an RL optimizer step), ``checkpoint_write`` (a checkpoint's files written, its manifest not),
``eval_batch`` (after an evaluation batch is written).
"""
from __future__ import annotations

import os
import signal

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT, "USR1": signal.SIGUSR1,
           "STOP": signal.SIGSTOP}

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("LAMPO_FAULT")
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    nth, _, sig = rest.partition(":")
    if sig.upper() not in SIGNALS and sig:
        raise ValueError(f"LAMPO_FAULT={spec!r}: the signal must be one of {', '.join(SIGNALS)}")
    only = os.environ.get("LAMPO_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), SIGNALS[sig.upper() or "KILL"])
