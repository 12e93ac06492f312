"""Fault injection for the kill-and-resume tests: ``LAMPO_FAULT=POINT[:N]`` SIGKILLs the process the N-th time (default
1st) execution reaches ``fault_point(POINT)``. Unset (always, outside tests), it costs one dict lookup."""
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
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
