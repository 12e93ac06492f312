"""Fault injection for the kill-and-resume tests: ``LAMPO_FAULT=POINT[:N]`` SIGKILLs the process the N-th time (default
1st) execution reaches ``fault_point(POINT)``; with ``LAMPO_FAULT_RANK=R`` only the process of rank R (torchrun's
``RANK``) dies. Unset (always, outside tests), it costs one dict lookup."""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("LAMPO_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    only = os.environ.get("LAMPO_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
