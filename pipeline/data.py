"""Training prompts: the tiny task, a local JSON Lines / JSON / Parquet / CSV file, or a hub dataset, mapped to rows
``{"id", "problem", "answer", "solution"}`` through the configured field names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.checks import PipelineError

if TYPE_CHECKING:
    from pipeline.config import Config, DataConfig

Row = dict[str, str]


def read_records(source: str, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Raw records with a location each (``file:line`` or ``hub:split[i]``) for error messages."""
    path = Path(source)
    if path.exists():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            out = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PipelineError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete the line") from None
                    out.append((f"{path}:{lineno}", rec))
            return out
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise PipelineError(f"{path}: a .json data file must hold a list of records")
            return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
        if suffix in (".parquet", ".csv"):
            import datasets

            ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
            return [(f"{path}[{i}]", dict(r)) for i, r in enumerate(ds)]
        raise PipelineError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
    name = source.removeprefix("hub:")
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise PipelineError(f"data source {source!r} is neither an existing file nor a hub dataset id (ORG/NAME)")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise PipelineError(f"cannot load hub dataset {name!r} split {split!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); pass a local file instead") from None
    return [(f"{name}:{split}[{i}]", dict(r)) for i, r in enumerate(ds)]


def map_rows(records: list[tuple[str, dict[str, Any]]], data: DataConfig) -> list[Row]:
    """Apply the field mapping; a record missing the prompt or answer field is a one-line error naming it."""
    rows = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
        for field_name in (data.prompt_field, data.answer_field):
            if rec.get(field_name) in (None, ""):
                raise PipelineError(f"{where}: missing field {field_name!r} (set data.prompt_field / "
                                    f"data.answer_field to the names this file uses; it has {sorted(rec)})")
        rows.append({"id": str(rec.get("id", where)), "problem": str(rec[data.prompt_field]),
                     "answer": str(rec[data.answer_field]), "solution": str(rec.get(data.solution_field) or "")})
    if not rows:
        raise PipelineError("the data source has no records")
    return rows


def load_rows(cfg: Config, which: str) -> list[Row]:
    """``which`` is ``train`` or ``heldout``: the rows of ``data.train`` / ``data.heldout``."""
    source = cfg.data.train if which == "train" else cfg.data.heldout
    if source == "tiny":
        from pipeline.tiny.task import make_split

        n = cfg.data.tiny_train_size if which == "train" else cfg.data.tiny_heldout_size
        return make_split(which, n, seed=cfg.run.seed)
    return map_rows(read_records(source, cfg.data.split if which == "train" else "test"), cfg.data)


def format_prompt(row: Row, cfg: Config, tokenizer: Any) -> list[int]:
    """Prompt token ids: the template filled with the row, wrapped in the chat template when configured."""
    text = cfg.data.prompt_template.format(problem=row["problem"])
    if cfg.data.use_chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)[-cfg.data.max_prompt_tokens:]
