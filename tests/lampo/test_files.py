"""lampo.files: a failed write leaves the old file and no temporary file; a finished one is fsync-ed and whole."""
from __future__ import annotations

import json
import os
import threading

import pytest

from lampo import files as lio
from lampo.files import atomic_open, atomic_path, atomic_write_json, atomic_write_text


def test_writes_text_and_json_in_the_formats_the_callers_had(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "héllo\n")  # the parent folder is created
    assert (tmp_path / "a" / "b.txt").read_bytes() == "héllo\n".encode()
    data = {"x": [1, 2.5], "é": None}
    atomic_write_json(tmp_path / "s.json", data)
    assert (tmp_path / "s.json").read_text(encoding="utf-8") == json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write_json(tmp_path / "t.json", data, indent=1, ensure_ascii=True)
    assert (tmp_path / "t.json").read_text() == json.dumps(data, indent=1) + "\n"
    with pytest.raises(ValueError):  # allow_nan=False reaches json.dumps, and nothing is written
        atomic_write_json(tmp_path / "n.json", {"v": float("nan")}, allow_nan=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "s.json", "t.json"]


@pytest.mark.parametrize("how", ["open", "path", "text"])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, how):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old\n")

    class Killed(Exception):
        pass

    with pytest.raises(Killed):
        if how == "open":
            with atomic_open(target) as f:
                f.write("new, half")
                raise Killed
        elif how == "path":
            with atomic_path(target) as tmp:
                tmp.write_text("new, half")
                raise Killed
        else:
            class Bad:
                def __str__(self) -> str:
                    raise Killed
            atomic_write_json(target, {"v": Bad()}, default=str)  # fails while the text is being made
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(lio.os, "fsync", lambda fd: (events.append("fsync:" + ("dir" if os.path.isdir(
        f"/proc/self/fd/{fd}") else "file")), real_fsync(fd))[1])
    monkeypatch.setattr(lio.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_text(tmp_path / "f", "x")
    assert events == ["fsync:file", "replace", "fsync:dir"]
    events.clear()
    with atomic_open(tmp_path / "g", "wb") as f:
        f.write(b"\x00\x01")
    assert events == ["fsync:file", "replace", "fsync:dir"]
    assert (tmp_path / "g").read_bytes() == b"\x00\x01"


def test_concurrent_writers_of_one_file_use_their_own_temporary_names(tmp_path):
    """Shards of one evaluation may write meta.json at the same moment: each writer has its own temporary name, so
    neither renames the other's half-written file."""
    target = tmp_path / "meta.json"
    seen: list[str] = []
    entered = threading.Barrier(2)

    def writer(text: str) -> None:
        with atomic_path(target) as tmp:
            seen.append(tmp.name)
            tmp.write_text(text)
            entered.wait(timeout=10)  # both temporary files exist at once

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a" * 1000, "b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2 and all(n.startswith(".meta.json.") and n.endswith(".tmp") for n in seen)
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode must be"), atomic_open("/nonexistent/x", "a"):
        pass
