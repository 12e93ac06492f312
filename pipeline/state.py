"""The run folder: atomic writes, per-stage state files and checkpoint bookkeeping.

A kill at any moment leaves every file either at its old or at its new content: files are written to a temporary
name and renamed (:mod:`lampo.files`); a checkpoint folder is written as ``NAME.tmp`` and renamed when complete; a
stage's state file points at a checkpoint only after that rename.

Every checkpoint folder holds a ``MANIFEST.json``, written last (after every rank's files): the relative path, size
and sha256 of each file in it. A checkpoint is usable only when its manifest is present and matches the folder
exactly (:func:`verify_manifest`), which catches what the rename cannot: a file truncated or altered later (a full
disk, a bad copy, bit rot), a file deleted from the folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lampo.files import atomic_write_json
from pipeline.stages import STAGES


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


MANIFEST = "MANIFEST.json"
# the name of an atomic write's temporary file: NAME.tmp, NAME.PID.tmp, .NAME.tmpPID
TEMP_FILE = re.compile(r"\.tmp\d*$")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at a time (hashing releases the GIL): a sharded checkpoint has many files."""
    if len(paths) < 2:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the manifest, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``folder/MANIFEST.json`` (atomically) listing every other file under ``folder`` with its size and sha256,
    read back from disk. Call it when every file of the checkpoint is written: what it lists is what a resume checks."""
    folder = Path(folder)
    rels = _files(folder)
    digests = _sha256_all([folder / rel for rel in rels])
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": d} for rel, d in zip(rels, digests)}
    manifest = {"format": 1, "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def verify_manifest(folder: str | Path, *, full: bool = True) -> str | None:
    """None when ``folder`` matches its ``MANIFEST.json`` exactly (every listed file present with its size and
    sha256, no file left out of it); else what is wrong, naming the file: ``"model.safetensors has 1000 bytes, the
    manifest says 2048 (truncated?)"``. ``full=False`` checks the file list and sizes only, not the contents."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder is missing"
    mf = folder / MANIFEST
    if not mf.is_file():
        return f"{MANIFEST} is missing (the checkpoint was not completed, or was written by an older LamPO)"
    try:
        files = json.loads(mf.read_text())["files"]
        listed = {str(rel): (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    problems, to_hash = [], []
    for rel, (size, _) in listed.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif (got := f.stat().st_size) != size:
            problems.append(f"{rel} has {got} bytes, the manifest says {size}"
                            + (" (truncated?)" if got < size else ""))
        else:
            to_hash.append(rel)
    if full:
        for rel, digest in zip(to_hash, _sha256_all([folder / rel for rel in to_hash])):
            if digest != listed[rel][1]:
                problems.append(f"{rel} has sha256 {digest[:16]}..., the manifest says {listed[rel][1][:16]}... (its "
                                "content changed after it was written)")
    extra = [rel for rel in _files(folder) if rel not in listed]
    if extra:
        problems.append(f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} not listed in the manifest "
                        "(written after it?)")
    return "; ".join(problems) or None


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def checkpoint_step(path: str | Path) -> int:
    """N of a checkpoint folder ``step_N``."""
    return int(Path(path).name.split("_", 1)[1])


@dataclass
class StageState:
    """What a stage has done: ``status`` is pending | running | preempted | done (preempted: stopped by a signal at a
    safe point, details in ``extra["preempted"]``; it resumes like a running one); ``step`` counts finished
    steps/iterations; ``checkpoint`` is the folder to resume from (relative to the run folder); ``output`` the
    stage's product."""

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
    def tensorboard(self) -> Path:
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
        shutil.rmtree(self.path(STAGES[stage].folder), ignore_errors=True)

    def clean_partial(self) -> None:
        """Remove what a kill left half-written (the complete versions are untouched): checkpoint folders ``*.tmp``
        and ``*.old``, and the temporary files of atomic writes, whose names end in ``.tmp`` or ``.tmp<pid>``
        (:func:`atomic_write_text` here, and the writers in ``evaluation`` and ``lampo``, which name them alike).
        Called by the main rank at the start of a run, before any rank writes."""
        for p in list(self.root.rglob("*.tmp")) + list(self.root.rglob("*.old")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.rglob("*.tmp*"):
            if p.is_file() and TEMP_FILE.search(p.name):
                p.unlink(missing_ok=True)

    @staticmethod
    def checkpoints(folder: Path) -> list[Path]:
        """The complete checkpoint folders ``step_N`` in ``folder``, oldest first."""
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.glob("step_*") if p.is_dir() and p.name[len("step_"):].isdigit()),
                      key=checkpoint_step)

    def prune_checkpoints(self, folder: Path, keep: int, protect: str | None = None) -> None:
        """Remove all but the ``keep`` newest checkpoints in ``folder`` (``keep`` >= 1), never ``protect`` (the newest
        good checkpoint, relative to the run folder)."""
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        for p in self.checkpoints(folder)[:-keep]:
            if protect is None or self.path(protect).resolve() != p.resolve():
                shutil.rmtree(p, ignore_errors=True)
