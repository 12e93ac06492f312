"""Training prompts: the tiny task, a local JSON Lines / JSON / Parquet / CSV file, or a hub dataset, mapped to rows
``{"id", "problem", "answer", "solution"}`` through the configured field names."""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaluation.data import BenchmarkDataError, HubSource, parse_hub, read_hub, read_local
from evaluation.tiny_task import make_split
from lampo.seeds import derive_seed
from pipeline.checks import PipelineError

if TYPE_CHECKING:
    from pipeline.config import Config, DataConfig

Row = dict[str, str]


def read_records(source: str, split: str = "train") -> list[tuple[str, dict[str, Any]]]:
    """Raw records with a location each (``file:line`` or ``hub-id[i]``) for error messages. Reading is shared with
    the evaluation package; unlike a benchmark, training data with a bad row is refused rather than skipped."""
    try:
        if not Path(source).exists() and (source.startswith((".", "/")) or Path(source).suffix):
            raise PipelineError(f"data file {source!r} does not exist (data.train / data.heldout)")
        if Path(source).exists():
            rows, bad = read_local(source)
            if bad:
                raise PipelineError(f"{bad[0]}; fix or delete that row ({len(bad)} bad row(s) in the file)")
        else:
            hub = parse_hub(source)
            rows = read_hub(hub if "@" in source else HubSource(hub.dataset, hub.config, split))
    except BenchmarkDataError as e:
        raise PipelineError(str(e).replace("benchmark file", "data file")) from None
    return [(r.pop("where"), r) for r in rows]


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
        answer = str(rec[data.answer_field])
        if data.answer_after:
            _, marker, answer = answer.rpartition(data.answer_after)
            answer = answer.strip()
            if not marker or not answer:
                raise PipelineError(f"{where}: field {data.answer_field!r} has no answer after "
                                    f"{data.answer_after!r} (data.answer_after); fix the row or unset the marker")
        rows.append({"id": str(rec.get("id", where)), "problem": str(rec[data.prompt_field]),
                     "answer": answer, "solution": str(rec.get(data.solution_field) or "")})
    if not rows:
        raise PipelineError("the data source has no records")
    return rows


def load_rows(cfg: Config, which: str) -> list[Row]:
    """``which`` is ``train`` or ``heldout``: the rows of ``data.train`` / ``data.heldout``."""
    source = cfg.data.train if which == "train" else cfg.data.heldout
    if source == "tiny":
        n = cfg.data.tiny_train_size if which == "train" else cfg.data.tiny_heldout_size
        return make_split(which, n, seed=cfg.run.seed, ops=cfg.data.tiny_ops)
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


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the ``step``-th batch of an endless sequence of shuffled epochs over ``n`` examples: a function of
    ``(seed, step)`` alone, so a resumed stage sees the batches it would have seen. The SFT stage draws its examples
    with it, the RL stage each iteration's prompts (seed stream ``sft_order``, :mod:`lampo.seeds`)."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = list(range(n))
        random.Random(derive_seed(seed, "sft_order", epoch)).shuffle(perm)
        take = min(batch_size - len(out), n - offset)
        out += perm[offset:offset + take]
        pos += take
    return out
