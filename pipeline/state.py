"""The run folder: atomic writes, per-stage state files and checkpoint bookkeeping.

A kill at any moment leaves every file either at its old or at its new content: files are written to a temporary
name and renamed; a checkpoint folder is written as ``NAME.tmp`` and renamed when complete; a stage's state file
points at a checkpoint only after that rename.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


STAGE_FOLDERS = {"evaluate": "eval"}  # where a stage writes, when not in a folder of its own name


@dataclass
class StageState:
    """What a stage has done: ``status`` is pending | running | done; ``step`` counts finished steps/iterations;
    ``checkpoint`` is the folder to resume from (relative to the run folder); ``output`` the stage's product."""

    name: str
    status: str = "pending"
    step: int = 0
    checkpoint: str | None = None
    output: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """Paths inside a run folder, and the stage state files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def tb(self) -> Path:
        return self.path("tensorboard")

    def state(self, stage: str) -> StageState:
        f = self.path("state", f"{stage}.json")
        if not f.exists():
            return StageState(stage)
        try:
            return StageState(**json.loads(f.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise RuntimeError(f"{f} is corrupt ({e}); delete it to rerun stage {stage!r}") from None

    def save_state(self, st: StageState) -> None:
        atomic_write_json(self.path("state", f"{st.name}.json"), asdict(st))

    def reset_stage(self, stage: str) -> None:
        """Forget a stage: its state file and its output folder (so nothing stale is resumed or reused)."""
        f = self.path("state", f"{stage}.json")
        if f.exists():
            f.unlink()
        shutil.rmtree(self.path(STAGE_FOLDERS.get(stage, stage)), ignore_errors=True)

    def clean_partial(self) -> None:
        """Remove half-written checkpoint folders left by a kill (their complete versions are untouched)."""
        for tmp in list(self.root.rglob("*.tmp")) + list(self.root.rglob("*.old")):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)

    def prune_checkpoints(self, folder: Path, keep: int, protect: str | None = None) -> None:
        ckpts = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))
        for p in ckpts[:-keep] if keep > 0 else []:
            if protect is None or self.path(protect).resolve() != p.resolve():
                shutil.rmtree(p, ignore_errors=True)
