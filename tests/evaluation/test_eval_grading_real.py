"""The benchmark path against the real data, end to end: load -> prompt -> engine -> decode -> grade -> metrics.

A scripted engine answers every real problem as a model would ("... so the answer is \\boxed{<answer>}"), first with
the problem's gold answer (avg@1 is the acceptance rate), then with another row's differently spelled answer (avg@1 is
the false-acceptance rate); each must be right for at least 99% of rows. The exact figures and every failure, read
back from responses.jsonl, are printed (run with ``-s``) and put in the assertion message.

The grader itself is tested on the raw rows by tests/lampo/rewards/test_math_acceptance.py; this file checks what
evaluation adds on top: field mapping and gold normalisation (GSM8K's ``answer_normalized``), prompt encoding, response
decoding, record keeping and the metrics.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from torch import Tensor

from evaluation.benchmarks import load_benchmark
from evaluation.engine import Generation, RolloutEngine, SamplingParams
from evaluation.grading import GRADERS
from evaluation.prompts import encode_prompt
from evaluation.run import evaluate

from .conftest import REAL_FILES


def as_model_writes(answer: str) -> str:
    return f"Let me work through it step by step. ... so the answer is \\boxed{{{answer}}}."


class AnswerEngine(RolloutEngine):
    """Answers each prompt (recognised by its token ids) with a fixed final answer."""

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str]):
        self.tokenizer, self.answers = tokenizer, answers

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        out = []
        for i, ids in enumerate(prompts):
            resp = self.tokenizer(as_model_writes(self.answers[tuple(ids)]), add_special_tokens=False)["input_ids"]
            out += [Generation(i, resp + [self.tokenizer.eos_token_id], None, True)] * params.n
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        raise NotImplementedError


def other_answers(answers: list[str]) -> list[str]:
    """For each row, the next row's answer that is spelled differently."""
    out = []
    for i, a in enumerate(answers):
        j = (i + 1) % len(answers)
        while answers[j].strip() == a.strip():
            j = (j + 1) % len(answers)
        out.append(answers[j])
    return out


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_benchmark_path_accepts_gold_and_rejects_other_rows(shared_data: Path, tmp_path: Path, char_tokenizer,
                                                            name: str) -> None:
    problems = load_benchmark(name, data_dir=shared_data).problems
    ids = [tuple(encode_prompt(char_tokenizer, p.text, style="plain")) for p in problems]
    assert len(set(ids)) == len(ids)
    golds = [p.answer for p in problems]
    figures, failures = {}, []
    for run, answers in (("gold", golds), ("other", other_answers(golds))):
        res = evaluate(AnswerEngine(char_tokenizer, dict(zip(ids, answers))), char_tokenizer, [name],
                       out_dir=tmp_path / run, data_dir=shared_data, batch_size=512, prompt_style="plain",
                       progress=False)
        recs = [json.loads(x) for x in (tmp_path / run / name / "responses.jsonl").read_text().splitlines()]
        assert [r["problem_id"] for r in recs] == [p.id for p in problems]
        acc = res["benchmarks"][name]["metrics"]["avg@1"]
        assert acc == pytest.approx(sum(r["correct"] for r in recs) / len(recs))
        if run == "gold":
            figures["accepted"] = acc
            failures += [f"not accepted: {r['problem_id']}: gold {r['gold']!r}, extracted {r['extracted']!r} "
                         f"({r['grade_error']})" for r in recs if not r["correct"]]
        else:
            figures["rejected"] = 1 - acc
            failures += [f"not rejected: {r['problem_id']}: gold {r['gold']!r}, accepted {r['extracted']!r}"
                         for r in recs if r["correct"]]
    n = len(problems)
    report = (f"{name} ({n} rows): gold accepted {round(figures['accepted'] * n)}/{n} "
              f"({100 * figures['accepted']:.2f}%), another row's answer rejected {round(figures['rejected'] * n)}/{n} "
              f"({100 * figures['rejected']:.2f}%)\n" + "".join(f"  {x}\n" for x in failures))
    print(report)
    assert figures["accepted"] >= 0.99 and figures["rejected"] >= 0.99, report


@pytest.mark.parametrize("name,raw_field", [("gsm8k", "answer"), ("aime24", "source_answer")])
def test_source_spellings_are_accepted(shared_data: Path, name: str, raw_field: str) -> None:
    """Answers as the sources spell them - GSM8K with thousands separators ("2,125"), AIME zero-padded ("025") - are
    what a model often writes; they must match the normalised gold."""
    rows = [json.loads(x) for x in (shared_data / REAL_FILES[name]).read_text().splitlines() if x.strip()]
    gold = {p.id: p.answer for p in load_benchmark(name, data_dir=shared_data).problems}
    grader = GRADERS["math"]
    fails = [f"{r['id']}: {r[raw_field]!r} vs gold {gold[r['id']]!r}" for r in rows
             if not grader.grade(as_model_writes(str(r[raw_field])), gold[r["id"]], 5.0).correct]
    differing = sum(str(r[raw_field]) != gold[r["id"]] for r in rows)
    print(f"{name}: {len(rows) - len(fails)}/{len(rows)} source spellings accepted ({differing} differ from the gold)")
    assert differing > 0 and not fails, fails
