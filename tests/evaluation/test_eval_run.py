"""The evaluation loop end to end with a scripted engine: exact metrics, audit trail, resume after a kill, bad rows."""
from __future__ import annotations

import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import pytest

from evaluation.grading import GRADERS
from evaluation.report import log_to_tensorboard, scalars
from evaluation.run import ResumeMismatch, evaluate
from evaluation.tiny_task import expression_of

from .conftest import ScriptedEngine

K = 4


def truth(problem: str) -> int:
    return eval(expression_of(problem))  # noqa: S307 - the tiny task's expressions are digits, + and -


def n_correct(problem: str) -> int:
    """How many of the K samples the scripted model gets right on this problem (0..K, varies across problems)."""
    return (abs(truth(problem)) * 7 + len(problem)) % (K + 1)


def respond(problem: str, s: int) -> str:
    """Samples 0..c-1 are right; later even samples box a wrong number, odd ones give no boxed answer."""
    v = truth(problem)
    if s < n_correct(problem):
        return f"{expression_of(problem)}={v}\n\\boxed{{{v}}}"
    return f"I think \\boxed{{{v + 1}}}" if s % 2 == 0 else "no idea"


def expected(problems: list[str]) -> dict[str, float]:
    """The metrics computed independently of evaluation.metrics, from the script above."""
    out: dict[str, float] = {}
    cs = [n_correct(p) for p in problems]
    out[f"avg@{K}"] = sum(c / K for c in cs) / len(cs)
    for j in (1, 2, 4):
        out[f"pass@{j}"] = sum(float(1 - Fraction(math.comb(K - c, j), math.comb(K, j))) for c in cs) / len(cs)
    maj = 0
    for c in cs:
        wrong_votes = sum(1 for s in range(c, K) if s % 2 == 0)
        maj += c > wrong_votes or (c == wrong_votes and c > 0)  # a tie goes to the answer seen first: the right one
    out[f"maj@{K}"] = maj / len(cs)
    return out


def run(engine, tmp: Path, limit: int | None = 10, benchmarks: tuple[str, ...] = ("tiny",), **kw):
    args = dict(samples=K, temperature=1.0, top_p=1.0, max_new_tokens=40, out_dir=tmp, limit=limit, batch_size=3,
                progress=False, model_id="scripted")
    return evaluate(engine, engine.tokenizer, list(benchmarks), **{**args, **kw})


def test_metrics_and_files_match_the_script(char_tokenizer, tmp_path: Path) -> None:
    eng = ScriptedEngine(char_tokenizer, respond)
    res = run(eng, tmp_path)
    r = res["benchmarks"]["tiny"]
    problems = eng.prompts_seen
    assert len(problems) == 10 and [n for n, _ in eng.calls] == [3, 3, 3, 1]
    want = expected(problems)
    for key, value in want.items():
        assert r["metrics"][key] == pytest.approx(value), key
    assert 0 < want[f"avg@{K}"] < 1 and want["pass@4"] > want["pass@1"]  # the script is not degenerate
    assert r["n_problems"] == 10 and r["samples"] == K and r["skipped_rows"] == []
    # every response is on disk with what is needed to audit its grade
    recs = [json.loads(x) for x in (tmp_path / "tiny" / "responses.jsonl").read_text().splitlines()]
    assert len(recs) == 10 * K and not (tmp_path / "tiny" / "responses.partial.jsonl").exists()
    math_grader = GRADERS["math"]
    for rec in recs:
        assert rec["response"] == respond(rec["prompt"], rec["sample"])
        assert rec["gold"] == str(truth(rec["prompt"]))
        assert rec["correct"] == (rec["sample"] < n_correct(rec["prompt"]))
        assert rec["correct"] == math_grader.grade(rec["response"], rec["gold"], 5.0).correct
        assert rec["extracted"] is None or rec["extracted"].lstrip("-").isdigit()
        assert rec["finished"] and rec["n_tokens"] == len(rec["response"]) + 1 - rec["response"].count("\\boxed{") * 6
    assert r["no_answer"] == pytest.approx(sum(1 for x in recs if x["extracted"] is None) / len(recs))
    # results.json is the returned dict; report.md has the table
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    report = (tmp_path / "report.md").read_text()
    assert "| benchmark | problems | avg@k |" in report and "| tiny | 10 |" in report


def test_resume_after_a_kill_does_not_regenerate_finished_problems(char_tokenizer, tmp_path: Path, caplog) -> None:
    whole = ScriptedEngine(char_tokenizer, respond)
    ref = run(whole, tmp_path / "ref")
    out = tmp_path / "run"
    killed = ScriptedEngine(char_tokenizer, respond, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run(killed, out)
    partial = out / "tiny" / "responses.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 6 * K and not (out / "results.json").exists()
    with open(partial, "a") as f:
        f.write('{"benchmark": "tiny", "problem_id": "tiny-hel')  # a write torn by the kill
    again = ScriptedEngine(char_tokenizer, respond)
    with caplog.at_level(logging.WARNING, logger="evaluation"):
        res = run(again, out)
    assert "torn line" in caplog.text
    assert [n for n, _ in again.calls] == [3, 1]  # only the 4 unfinished problems
    assert [s for _, s in again.calls] == [s for _, s in whole.calls[2:]]  # and sampled with the same seeds
    assert res["benchmarks"] == ref["benchmarks"]
    final = "tiny/responses.jsonl"
    assert (out / final).read_bytes() == (tmp_path / "ref" / final).read_bytes()
    # a finished run is not generated again; a larger limit generates only the new problems
    idle = ScriptedEngine(char_tokenizer, respond)
    assert run(idle, out)["benchmarks"] == ref["benchmarks"] and idle.calls == []
    more = ScriptedEngine(char_tokenizer, respond)
    assert run(more, out, limit=12)["benchmarks"]["tiny"]["n_problems"] == 12
    assert [n for n, _ in more.calls] == [2]
    # a problem whose gold answer changed on disk is generated again
    final = out / "tiny" / "responses.jsonl"
    recs = [json.loads(x) for x in final.read_text().splitlines()]
    recs[0]["gold"] = "12345"
    final.write_text("".join(json.dumps(r) + "\n" for r in recs))
    redo = ScriptedEngine(char_tokenizer, respond)
    run(redo, out, limit=12)
    assert [n for n, _ in redo.calls] == [1] and json.loads(final.read_text().splitlines()[0])["gold"] != "12345"


def test_other_settings_in_the_same_folder_are_refused(char_tokenizer, tmp_path: Path) -> None:
    run(ScriptedEngine(char_tokenizer, respond), tmp_path, limit=2)
    eng = ScriptedEngine(char_tokenizer, respond)
    with pytest.raises(ResumeMismatch, match=r"temperature: 1.0 -> 0.5"):
        run(eng, tmp_path, limit=2, temperature=0.5)
    assert eng.calls == []


def test_a_file_with_bad_rows_reports_them_and_evaluates_the_rest(char_tokenizer, tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    good = [{"id": f"g{i}", "problem": f"What is {i}+1-0+0?", "answer": str(i + 1)} for i in range(4)]
    lines = [json.dumps(good[0]), "oops", json.dumps(good[1]), json.dumps({"id": "x", "problem": "What is 1+1-0+0?"}),
             json.dumps(good[2]), json.dumps(good[3])]
    f.write_text("\n".join(lines) + "\n")
    eng = ScriptedEngine(char_tokenizer, lambda text, s: f"\\boxed{{{truth(text.splitlines()[0])}}}")
    res = run(eng, tmp_path / "out", benchmarks=(f"aime24={f}",), prompt_style="plain", samples=1, limit=None)
    r = res["benchmarks"]["aime24"]
    assert r["n_problems"] == 4 and r["metrics"]["avg@1"] == 1.0
    assert r["skipped_rows"] == [f"{f}:2: not valid JSON (Expecting value at column 1)",
                                 f"{f}:4: missing answer (looked for the field 'answer', 'Answer')"]
    assert f"{f}:4: missing answer" in (tmp_path / "out" / "report.md").read_text()


def test_unknown_benchmark_fails_before_generating(char_tokenizer, tmp_path: Path) -> None:
    eng = ScriptedEngine(char_tokenizer, respond)
    with pytest.raises(KeyError, match="known: aime24, aime25, gpqa_diamond, gsm8k, math500, tiny"):
        run(eng, tmp_path, benchmarks=("tiny", "aime2024"))
    assert eng.calls == []


def test_engine_returning_the_wrong_number_of_samples_is_an_error(char_tokenizer, tmp_path: Path) -> None:
    class Short(ScriptedEngine):
        def generate(self, prompts, params):
            return super().generate(prompts, params)[:-1]

    with pytest.raises(RuntimeError, match="expected 4 each"):
        run(Short(char_tokenizer, respond), tmp_path, limit=2)


def test_tensorboard_scalars(char_tokenizer, tmp_path: Path) -> None:
    res = run(ScriptedEngine(char_tokenizer, respond), tmp_path / "o", limit=5)

    class Writer:
        def __init__(self):
            self.seen = []

        def add_scalar(self, tag, value, step):
            self.seen.append((tag, value, step))

    w = Writer()
    written = log_to_tensorboard(w, res, step=7, prefix="eval")
    assert written == scalars(res) and len(w.seen) == len(written)
    assert ("eval/tiny/avg@4", res["benchmarks"]["tiny"]["metrics"]["avg@4"], 7) in w.seen
    assert not any(tag.endswith("_se") for tag, _, _ in w.seen)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as sw:
        log_to_tensorboard(sw, res, step=1)
    assert any((tmp_path / "tb").iterdir())


def test_gpqa_multiple_choice_end_to_end(char_tokenizer, tmp_path: Path) -> None:
    from .test_eval_data import write_gpqa

    write_gpqa(tmp_path / "gpqa_diamond.csv", 8)

    def pick(text: str, s: int) -> str:
        """Sample 0 boxes the right option's letter; sample 1 names a wrong letter in words."""
        letters = {line[3:]: line[0] for line in text.splitlines() if line[1:3] == ") "}
        right = next(L for opt, L in letters.items() if opt.startswith("right"))
        wrong = next(L for L in "ABCD" if L != right)
        return f"So \\boxed{{{right}}}" if s == 0 else f"The answer is ({wrong})."

    res = run(ScriptedEngine(char_tokenizer, pick), tmp_path / "o", benchmarks=("gpqa_diamond",), samples=2,
              data_dir=tmp_path, limit=None)
    r = res["benchmarks"]["gpqa_diamond"]
    assert r["n_problems"] == 8 and r["metrics"]["avg@2"] == 0.5 and r["metrics"]["pass@2"] == 1.0
    assert r["metrics"]["maj@2"] == 1.0  # a 1-1 tie goes to the answer given first
    assert set(r["breakdown"]["domain"]) == {"Physics", "Chemistry", "Biology"}
    recs = [json.loads(x) for x in (tmp_path / "o" / "gpqa_diamond" / "responses.jsonl").read_text().splitlines()]
    assert all(x["extracted"] in tuple("ABCD") and x["gold"] in tuple("ABCD") for x in recs)


@pytest.mark.parametrize("count", [2, 3])
def test_sharded_calls_then_assembly_equal_one_call(char_tokenizer, tmp_path: Path, count: int) -> None:
    """Shards generate disjoint fixed batches with the seeds one engine would use; the assembling call generates
    nothing and writes what one call writes."""
    one = ScriptedEngine(char_tokenizer, respond)
    want = run(one, tmp_path / "one")
    shards = [ScriptedEngine(char_tokenizer, respond) for _ in range(count)]
    for i, eng in enumerate(shards):
        assert run(eng, tmp_path / "sharded", shard=(i, count)) is None
        assert (tmp_path / "sharded" / "tiny" / f"responses.partial.{i}.jsonl").exists()
    assert not (tmp_path / "sharded" / "results.json").exists()
    assert sorted(c for e in shards for c in e.calls) == sorted(one.calls)  # same batches, same seeds
    assert all(e.calls for e in shards[:2])  # 10 problems in batches of 3: every shard gets work
    assembler = ScriptedEngine(char_tokenizer, respond)
    got = run(assembler, tmp_path / "sharded")
    assert assembler.calls == []
    assert got["benchmarks"] == want["benchmarks"]
    assert (tmp_path / "sharded" / "tiny" / "responses.jsonl").read_text() == \
        (tmp_path / "one" / "tiny" / "responses.jsonl").read_text()
    assert not list((tmp_path / "sharded" / "tiny").glob("responses.partial*"))


def test_a_shard_killed_midway_leaves_the_rest_to_the_assembling_call(char_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run(ScriptedEngine(char_tokenizer, respond, fail_after=1), tmp_path, shard=(0, 2))
    run(ScriptedEngine(char_tokenizer, respond), tmp_path, shard=(1, 2))
    finisher = ScriptedEngine(char_tokenizer, respond)
    got = run(finisher, tmp_path)
    assert len(finisher.calls) == 1  # shard 0 finished one of its two batches (problems 0-2; 6-8 remain)
    want = run(ScriptedEngine(char_tokenizer, respond), tmp_path / "ref")
    assert got["benchmarks"] == want["benchmarks"]
