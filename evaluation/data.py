"""Reading benchmark rows from a local file or a hub dataset, with every unreadable row reported and skipped.

A *source* is one of

* a local file: ``.jsonl`` (JSON Lines), ``.json`` (a list of objects, or JSON Lines), ``.parquet`` or ``.csv``;
* a hub dataset: ``hub:ORG/NAME[:CONFIG][@SPLIT]``, read with ``datasets.load_dataset``.

Rows come back as plain dicts, each with ``where`` - ``file:line`` (or ``file:row N`` for Parquet, ``hub-id[i]`` for hub
rows) - so that later checks can name the exact row they reject.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class BenchmarkDataError(ValueError):
    """A benchmark's data cannot be read at all (missing file, unreachable hub set, no usable row)."""


@dataclass(frozen=True)
class BadRow:
    """One row that was skipped: ``where`` is ``file:line`` (or ``hub-id[index]``), ``reason`` says what is wrong."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class HubSource:
    dataset: str
    config: str | None = None
    split: str = "test"

    def __str__(self) -> str:
        cfg = f":{self.config}" if self.config else ""
        return f"hub:{self.dataset}{cfg}@{self.split}"


def parse_hub(spec: str) -> HubSource:
    """``hub:ORG/NAME[:CONFIG][@SPLIT]`` (the ``hub:`` prefix optional) -> :class:`HubSource`."""
    s = spec[4:] if spec.startswith("hub:") else spec
    split = "test"
    if "@" in s:
        s, split = s.rsplit("@", 1)
    config = None
    if ":" in s:
        s, config = s.split(":", 1)
    if s.count("/") != 1 or not all(s.split("/")):
        raise BenchmarkDataError(f"{spec!r} is not a hub dataset id; write hub:ORG/NAME[:CONFIG][@SPLIT]")
    return HubSource(s, config or None, split or "test")


def read_local(path: str | Path) -> tuple[list[dict[str, Any]], list[BadRow]]:
    """Read every row of a local file; rows that do not parse become :class:`BadRow` entries instead of errors."""
    p = Path(path)
    if not p.is_file():
        raise BenchmarkDataError(f"benchmark file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(p), []
    if suffix == ".csv":
        return _read_csv(p)
    if suffix == ".json":
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return _read_json_list(p, text)
        return _read_jsonl(p)
    if suffix == ".jsonl":
        return _read_jsonl(p)
    raise BenchmarkDataError(f"{p}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(p: Path) -> tuple[list[dict[str, Any]], list[BadRow]]:
    rows, bad = [], []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(BadRow(where, f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                bad.append(BadRow(where, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            rows.append({**obj, "where": where})
    return rows, bad


def _read_json_list(p: Path, text: str) -> tuple[list[dict[str, Any]], list[BadRow]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); fix the file or write it as JSON Lines "
                                 "so that one bad row does not spoil the others") from None
    rows, bad = [], []
    for i, obj in enumerate(data):
        where = f"{p}[{i}]"
        if isinstance(obj, dict):
            rows.append({**obj, "where": where})
        else:
            bad.append(BadRow(where, f"expected a JSON object, got {type(obj).__name__}"))
    return rows, bad


def _read_csv(p: Path) -> tuple[list[dict[str, Any]], list[BadRow]]:
    rows, bad = [], []
    with open(p, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        start = 2
        for row in reader:
            where = f"{p}:{start}"
            start = reader.line_num + 1
            if None in row or any(v is None for v in row.values()):
                bad.append(BadRow(where, f"has a different number of fields than the header ({len(header)})"))
                continue
            rows.append({**row, "where": where})
    return rows, bad


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise BenchmarkDataError(f"{p}: not a readable Parquet file ({e})") from None
    return [{**r, "where": f"{p}:row {i + 1}"} for i, r in enumerate(table.to_pylist())]


def read_hub(src: HubSource, access_hint: str = "") -> list[dict[str, Any]]:
    """Load a hub dataset split with ``datasets.load_dataset``; any failure becomes one clear error."""
    import datasets

    try:
        ds = datasets.load_dataset(src.dataset, src.config, split=src.split)
    except Exception as e:  # noqa: BLE001 - network, auth, missing-config errors all mean "cannot load"
        hint = access_hint or (
            "check the id, config and split, your network (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE must be unset and the "
            "hub reachable) or a local copy in the cache; or pass a local file instead (data_dir, or NAME=PATH)")
        raise BenchmarkDataError(f"cannot load hub dataset {src} ({type(e).__name__}: {e}). {hint}") from None
    return [{**r, "where": f"{src}[{i}]"} for i, r in enumerate(ds)]
