"""Run benchmarks through a rollout engine: generate in batches, grade, write, resume, summarise.

Output layout under ``out_dir``::

    results.json                      metrics of every benchmark and the settings (written last, atomically)
    report.md                         the same as Markdown tables
    <benchmark>/meta.json             the settings the responses were generated with (checked on resume)
    <benchmark>/responses.jsonl       every response with its extracted answer and grade, in problem order
    <benchmark>/responses.partial.jsonl   appended after each batch while running; folded into the above at the end

Resuming: run the same call again. Problems whose ``k`` responses are already in ``responses.jsonl`` or a partial
file are not generated again; a line torn by a kill is dropped and its problem regenerated. Each batch's sampling seed
depends only on ``seed``, the benchmark and the batch's first problem, so a run resumed after a kill between batches
samples exactly like an uninterrupted one (given an engine that honours ``SamplingParams.seed``). Changing a
generation setting (samples, temperature, top_p, max_new_tokens, seed, prompt style, model, data source) in an
existing folder is refused rather than mixing responses; ``limit`` may change (problems already done are reused, and
``responses.jsonl`` then holds the problems of the latest call).

Stopping between batches: ``after_batch`` (if given) is called after each batch is written; an exception it raises
stops the evaluation there, and a later call resumes after that batch (the pipeline stops this way on SIGTERM).

Sharding over several engines: problems are cut into fixed batches of ``batch_size`` (batch b holds problems
``b*batch_size ...``); the call with ``shard=(i, count)`` generates batches b with ``b % count == i`` into its own
``responses.partial.<i>.jsonl`` and returns None; a call without ``shard`` afterwards finds every problem on disk
and assembles ``responses.jsonl`` and the results, exactly as one engine would have written them (same batches, same
seeds).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from evaluation.benchmarks import LoadedBenchmark, Problem, load_benchmark
from evaluation.engine import RolloutEngine, SamplingParams
from evaluation.grading import GRADERS
from evaluation.metrics import breakdown, length_stats, majority_correct, score_metrics
from evaluation.prompts import PROMPT_STYLES, encode_prompt
from evaluation.report import write_report
from lampo.files import atomic_write_json, atomic_write_text
from lampo.seeds import derive_seed

log = logging.getLogger("evaluation")

FINAL, PARTIAL, META = "responses.jsonl", "responses.partial.jsonl", "meta.json"
PARTIALS = "responses.partial*.jsonl"  # the partial file of an unsharded call and those of every shard


class ResumeMismatch(ValueError):
    """An output folder holds responses generated with different settings."""


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: list[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    timeout_s: float = 5.0,
    progress: bool = True,
    prompt_style: str = "auto",
    model_id: str | None = None,
    shard: tuple[int, int] | None = None,
    after_batch: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``engine`` on each benchmark (``NAME`` or ``NAME=SOURCE``, see :mod:`evaluation.benchmarks`).

    ``samples`` responses per problem (k); ``temperature`` 0 is greedy. ``batch_size`` problems go to the engine per
    call (``batch_size * samples`` sequences) and are written before the next call. ``model_id`` (e.g. the checkpoint
    path) is recorded and checked on resume. All benchmarks are loaded before anything is generated, so a missing
    file fails fast. ``shard=(i, count)``: generate only this engine's share and return None (module docstring).
    ``after_batch``: called after each batch is written; it may raise to stop (module docstring).
    Returns the ``results.json`` content: ``{"settings": ..., "benchmarks": {name: {"metrics": {...},
    "breakdown": ..., "length": ..., "skipped_rows": [...], ...}}}``.
    """
    if samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"samples={samples}, batch_size={batch_size}, max_new_tokens={max_new_tokens} must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for every problem)")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style={prompt_style!r} is not one of {', '.join(PROMPT_STYLES)}")
    if temperature == 0 and samples > 1:
        log.warning("temperature 0 is greedy: the %d samples per problem will be identical; pass@k and maj@k then "
                    "equal avg@k", samples)
    names = [s.partition("=")[0].strip() for s in benchmarks]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"benchmarks={benchmarks!r}: give at least one, each name once")
    loaded = [load_benchmark(s, data_dir=data_dir, limit=limit) for s in benchmarks]  # fixed sets: no seed
    for lb in loaded:
        for bad in lb.bad_rows:
            log.warning("%s: skipped row %s", lb.benchmark.name, bad)
    settings = {"samples": samples, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": seed, "prompt_style": prompt_style, "model": model_id}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"settings": {**settings, "limit": limit, "timeout_s": timeout_s}, "benchmarks": {}}
    for lb in loaded:
        records = run_benchmark(engine, tokenizer, lb, settings, out / lb.benchmark.name, batch_size=batch_size,
                                timeout_s=timeout_s, progress=progress, shard=shard, after_batch=after_batch)
        if records is not None:
            results["benchmarks"][lb.benchmark.name] = summarize(lb, records, samples, timeout_s)
    if shard is not None:
        return None
    atomic_write_json(out / "results.json", results, allow_nan=False)
    write_report(out / "report.md", results)
    return results


# --------------------------------------------------------------------------------------------------------------------
# generation with resume


def run_benchmark(engine: RolloutEngine, tokenizer: Any, lb: LoadedBenchmark, settings: dict[str, Any], folder: Path,
                  *, batch_size: int, timeout_s: float, progress: bool,
                  shard: tuple[int, int] | None = None,
                  after_batch: Callable[[], None] | None = None) -> list[list[dict[str, Any]]] | None:
    """Generate and grade every problem (of this shard) not already on disk; returns ``records[p][s]`` in problem
    order, or None for a shard."""
    b, k = lb.benchmark, settings["samples"]
    index, count = shard if shard is not None else (0, 1)
    partial = folder / (PARTIAL if shard is None else f"responses.partial.{index}.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**settings, "benchmark": b.name, "source": lb.source}
    _check_meta(folder / META, meta)
    done = _load_done(folder, k, own=partial)

    def stale(p: Problem) -> bool:  # not on disk, or its text or gold answer changed since (an edited file)
        return p.id not in done or (done[p.id][0]["prompt"], done[p.id][0]["gold"]) != (p.text, p.answer)

    starts = range(0, len(lb.problems), batch_size)
    chunks = [[(i, lb.problems[i]) for i in range(s, min(s + batch_size, len(lb.problems))) if stale(lb.problems[i])]
              for n, s in enumerate(starts) if n % count == index]
    chunks = [c for c in chunks if c]
    todo = [x for c in chunks for x in c]
    grader = GRADERS[b.grader]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(lb.problems), initial=len(lb.problems) - len(todo), desc=b.name, unit="problem",
               disable=not progress or index > 0)
    params = dict(n=k, temperature=settings["temperature"], top_p=settings["top_p"],
                  max_new_tokens=settings["max_new_tokens"], logprobs=False)  # grading needs the tokens only
    style = settings["prompt_style"]
    with open(partial, "a", encoding="utf-8") as f:
        for chunk in chunks:
            prompts = [encode_prompt(tokenizer, p.text, chat=b.chat, style=style) for _, p in chunk]
            batch_seed = derive_seed(settings["seed"], "eval", b.name, chunk[0][0])
            gens = engine.generate(prompts, SamplingParams(**params, seed=batch_seed))
            by_prompt: list[list[Any]] = [[] for _ in chunk]
            for g in gens:
                by_prompt[g.prompt_index].append(g)
            if any(len(g) != k for g in by_prompt):
                raise RuntimeError(f"{b.name}: the engine returned {[len(g) for g in by_prompt]} responses per prompt; "
                                   f"expected {k} each")
            lines = []
            for (_, p), _prompt_ids, gs in zip(chunk, prompts, by_prompt):
                recs = [_record(b.name, p, s, g, tokenizer, grader, timeout_s) for s, g in enumerate(gs)]
                done[p.id] = recs
                lines += [json.dumps(r, ensure_ascii=False) + "\n" for r in recs]
            f.write("".join(lines))  # one write per batch; a kill tears at most the last line
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
            if after_batch is not None:
                after_batch()
    bar.close()
    if shard is not None:
        return None
    records = [done[p.id] for p in lb.problems]
    atomic_write_text(folder / FINAL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for rs in records for r in rs))
    for f in folder.glob(PARTIALS):
        f.unlink(missing_ok=True)
    return records


def _record(bench: str, p: Problem, sample: int, gen: Any, tokenizer: Any, grader: Any,
            timeout_s: float) -> dict[str, Any]:
    text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    g = grader.grade(text, p.answer, timeout_s)
    return {"benchmark": bench, "problem_id": p.id, "sample": sample, "prompt": p.text, "response": text,
            "extracted": g.extracted, "gold": p.answer, "correct": g.correct, "grade_error": g.error,
            "n_tokens": len(gen.token_ids), "finished": bool(gen.finished), "meta": p.meta}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"{key}: {old.get(key)!r} -> {meta.get(key)!r}" for key in sorted(set(old) | set(meta))
                if old.get(key) != meta.get(key)]
        if diff:
            raise ResumeMismatch(f"{path.parent} holds responses generated with other settings ({'; '.join(diff)}); "
                                 "use another output folder, or delete this one to start over")
        return
    atomic_write_json(path, meta, allow_nan=False)  # shards may write it at once: each rename is whole


def _load_done(folder: Path, k: int, own: Path) -> dict[str, list[dict[str, Any]]]:
    """Problems with all ``k`` responses on disk (the final file and every partial file). Unparsable lines (a write
    torn by a kill) are dropped, and this call's own partial file ``own`` is rewritten without them so that new
    batches append after a clean line end (another shard's file is its writer's to mend)."""
    by_id: dict[str, dict[int, dict[str, Any]]] = {}
    for path in [folder / FINAL, *sorted(folder.glob(PARTIALS))]:
        if not path.is_file():
            continue
        good, torn = [], 0
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                r = json.loads(line)
                by_id.setdefault(r["problem_id"], {})[int(r["sample"])] = r
                good.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                torn += 1
        if torn and path == own:
            log.warning("%s: dropped %d torn line(s) from an interrupted run", path, torn)
            atomic_write_text(path, "".join(good))
    return {pid: [s[i] for i in range(k)] for pid, s in by_id.items() if set(s) == set(range(k))}


# --------------------------------------------------------------------------------------------------------------------
# summary


def summarize(lb: LoadedBenchmark, records: list[list[dict[str, Any]]], k: int, timeout_s: float) -> dict[str, Any]:
    """Metrics of one benchmark from its graded records (``records[p][s]``)."""
    b = lb.benchmark
    grader = GRADERS[b.grader]
    correct = torch.tensor([[r["correct"] for r in rs] for rs in records], dtype=torch.bool)  # (P, k)
    lengths = torch.tensor([[r["n_tokens"] for r in rs] for rs in records], dtype=torch.long)  # (P, k)
    finished = torch.tensor([[r["finished"] for r in rs] for rs in records], dtype=torch.bool)  # (P, k)

    def same(a: str, c: str) -> bool:
        return grader.equivalent(a, c, timeout_s)

    maj = torch.tensor([majority_correct([r["extracted"] for r in rs], [r["correct"] for r in rs], same)
                        for rs in records], dtype=torch.bool)  # (P,)
    out: dict[str, Any] = {
        "source": lb.source,
        "n_problems": len(records),
        "samples": k,
        "metrics": score_metrics(correct, maj),
        "length": length_stats(lengths, finished, correct),
        "no_answer": sum(r["extracted"] is None for rs in records for r in rs) / max(1, correct.numel()),
        "grade_errors": sum(r["grade_error"] is not None for rs in records for r in rs),
        "breakdown": {},
        "skipped_rows": [str(x) for x in lb.bad_rows],
    }
    for field_name in b.breakdown:
        keys = [rs[0]["meta"].get(field_name, "unknown") for rs in records]
        if any(key != "unknown" for key in keys):
            out["breakdown"][field_name] = breakdown(correct, keys)
    return out
