"""Benchmark loading: the real files, bad rows, file formats, unknown names, missing files and gated/hub data."""
from __future__ import annotations

import csv
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from evaluation.benchmarks import BENCHMARKS, load_benchmark, parse_spec, shuffled_choices
from evaluation.data import BenchmarkDataError

from .conftest import REAL_FILES

EXPECTED_ROWS = {"math500": 500, "aime24": 30, "aime25": 30, "gsm8k": 1319}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_every_real_row_loads(shared_data: Path, name: str) -> None:
    lb = load_benchmark(name, data_dir=shared_data)
    raw = [json.loads(line) for line in (shared_data / REAL_FILES[name]).read_text().splitlines() if line.strip()]
    assert lb.bad_rows == []
    assert len(lb.problems) == len(raw) == EXPECTED_ROWS[name]
    assert len({p.id for p in lb.problems}) == len(raw)
    assert [p.id for p in lb.problems] == [r["id"] for r in raw]
    for p, r in zip(lb.problems, raw):
        assert p.text.startswith(r["problem"].strip()) and p.text.endswith("within \\boxed{}.")
        assert p.answer and p.answer == r.get("answer_normalized", r["answer"]).strip()
    if name == "math500":
        assert Counter(p.meta["level"] for p in lb.problems) == Counter(r["level"] for r in raw)
        assert len({p.meta["subject"] for p in lb.problems}) == 7


def test_limit_keeps_the_first_usable_problems(shared_data: Path) -> None:
    full = load_benchmark("aime24", data_dir=shared_data).problems
    assert load_benchmark("aime24", data_dir=shared_data, limit=5).problems == full[:5]


def test_bad_rows_are_reported_with_file_line_and_skipped(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    lines = [
        json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}),
        "{not json",
        json.dumps({"id": "b", "answer": "3"}),
        json.dumps({"id": "c", "problem": "2+2?", "answer": "  "}),
        "",
        json.dumps(["a", "list"]),
        json.dumps({"id": "a", "problem": "again?", "answer": "1"}),
        json.dumps({"id": "d", "problem": "3+3?", "answer": 6}),
        json.dumps({"id": "e", "problem": {"nested": 1}, "answer": "1"}),
    ]
    f.write_text("\n".join(lines) + "\n")
    lb = load_benchmark(f"aime24={f}")
    assert [p.id for p in lb.problems] == ["a", "d"]
    assert lb.problems[1].answer == "6"  # numbers become text
    reasons = {b.where: b.reason for b in lb.bad_rows}
    assert set(reasons) == {f"{f}:{n}" for n in (2, 3, 4, 6, 7, 9)}
    assert "not valid JSON" in reasons[f"{f}:2"]
    assert "missing problem" in reasons[f"{f}:3"]
    assert "answer is empty" in reasons[f"{f}:4"]
    assert "JSON object" in reasons[f"{f}:6"]
    assert "duplicate id 'a'" in reasons[f"{f}:7"] and f"{f}:1" in reasons[f"{f}:7"]
    assert "problem must be text" in reasons[f"{f}:9"]


def test_only_bad_rows_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": 1}\nnope\n')
    with pytest.raises(BenchmarkDataError, match="no usable problem.*bad.jsonl:1: missing problem"):
        load_benchmark(f"math500={f}")


def test_csv_parquet_and_json_list_read_the_same_rows(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(5)]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    with open(tmp_path / "x.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "problem", "answer"])
        w.writeheader()
        w.writerows(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    loaded = [load_benchmark(f"aime25={tmp_path / ('x' + ext)}").problems for ext in (".json", ".csv", ".parquet")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert [p.answer for p in loaded[0]] == ["0", "2", "4", "6", "8"]


def test_csv_short_row_is_reported_by_line(tmp_path: Path) -> None:
    f = tmp_path / "q.csv"
    f.write_text('id,problem,answer\na,"multi\nline problem",1\nb,only two\nc,ok?,3\n')
    lb = load_benchmark(f"aime24={f}")
    assert [p.id for p in lb.problems] == ["a", "c"]
    assert [b.where for b in lb.bad_rows] == [f"{f}:4"]


def test_unknown_benchmark_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as e:
        parse_spec("math501")
    msg = e.value.args[0]
    assert "unknown benchmark 'math501'" in msg
    for name in ("math500", "aime24", "aime25", "gpqa_diamond", "gsm8k", "tiny"):
        assert name in msg and name in BENCHMARKS


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match=str(tmp_path / "nope.jsonl")):
        load_benchmark(f"math500={tmp_path / 'nope.jsonl'}")
    with pytest.raises(BenchmarkDataError, match=str(tmp_path / "aime24.jsonl")):
        load_benchmark("aime24", data_dir=tmp_path)


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(tmp_path / "home"), raising=False)


def test_hub_dataset_without_network_or_cache_is_a_clear_fast_error(monkeypatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(BenchmarkDataError, match=r"cannot load hub dataset hub:HuggingFaceH4/MATH-500@test") as e:
        load_benchmark("math500")  # no data_dir: the hub default
    assert "local file" in str(e.value)
    assert time.monotonic() - t0 < 20  # offline mode answers at once; nothing waits on a socket


def test_missing_gated_gpqa_says_how_to_supply_it(monkeypatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    for call in (lambda: load_benchmark("gpqa_diamond"), lambda: load_benchmark("gpqa_diamond", data_dir=tmp_path)):
        with pytest.raises(BenchmarkDataError) as e:
            call()
        msg = str(e.value)
        assert "gated" in msg and "HF_TOKEN" in msg and "gpqa_diamond=/path/gpqa_diamond.csv" in msg
        assert "Incorrect Answer 1" in msg


GPQA_HEADER = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "High-level domain"]


def write_gpqa(path: Path, n: int, bad: bool = False) -> list[dict[str, str]]:
    """A synthetic file in the gated dataset's column layout (the real one is not shipped)."""
    rows = [{"Record ID": f"rec{i}", "Question": f"Which element has atomic number {i + 1}? (variant {i})",
             "Correct Answer": f" right {i}\n", "Incorrect Answer 1": f"wrong {i}a",
             "Incorrect Answer 2": f"wrong {i}b", "Incorrect Answer 3": f"wrong {i}c",
             "High-level domain": ["Physics", "Chemistry", "Biology"][i % 3]} for i in range(n)]
    if bad:
        rows[1]["Incorrect Answer 2"] = ""
        rows[2]["Incorrect Answer 3"] = rows[2]["Incorrect Answer 1"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=GPQA_HEADER)
        w.writeheader()
        w.writerows(rows)
    return rows


def test_gpqa_options_are_shuffled_by_a_fixed_seed_per_question(tmp_path: Path) -> None:
    rows = write_gpqa(tmp_path / "gpqa_diamond.csv", 40)
    lb = load_benchmark("gpqa_diamond", data_dir=tmp_path)
    assert lb.benchmark.grader == "choice" and len(lb.problems) == 40
    letters = Counter()
    for p, r in zip(lb.problems, rows):
        choices = p.meta["choices"]
        assert sorted(choices) == sorted(r[k].strip() for k in GPQA_HEADER[2:6])
        assert choices["ABCD".index(p.answer)] == r["Correct Answer"].strip()
        for L, c in zip("ABCD", choices):
            assert f"{L}) {c}" in p.text
        assert "letter of your final answer" in p.text
        letters[p.answer] += 1
    assert set(letters) == set("ABCD")  # the correct option is not always in one place
    # the order depends on the question alone: same in a second load and after reordering the file
    again = load_benchmark("gpqa_diamond", data_dir=tmp_path).problems
    assert [p.meta["choices"] for p in again] == [p.meta["choices"] for p in lb.problems]
    rev = tmp_path / "rev.csv"
    with open(rev, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=GPQA_HEADER)
        w.writeheader()
        w.writerows(rows[::-1])
    by_id = {p.id: p for p in load_benchmark(f"gpqa_diamond={rev}").problems}
    assert all(by_id[p.id].meta["choices"] == p.meta["choices"] for p in lb.problems)
    assert lb.problems[0].meta["domain"] == "Physics"


def test_gpqa_bad_rows_are_skipped(tmp_path: Path) -> None:
    write_gpqa(tmp_path / "g.csv", 5, bad=True)
    lb = load_benchmark(f"gpqa_diamond={tmp_path / 'g.csv'}")
    assert [p.id for p in lb.problems] == ["rec0", "rec3", "rec4"]
    reasons = [b.reason for b in lb.bad_rows]
    assert "incorrect_2 is empty" in reasons[0] and "not all different" in reasons[1]


def test_shuffled_choices_is_a_permutation_for_any_seed() -> None:
    for seed in range(20):
        opts, letter = shuffled_choices(f"q{seed}", "C", ["W1", "W2", "W3"], seed)
        assert sorted(opts) == ["C", "W1", "W2", "W3"] and opts["ABCD".index(letter)] == "C"


def test_gsm8k_hub_layout_answer_is_the_number_after_hashes(tmp_path: Path) -> None:
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "How many?", "answer": "Work <<2*3=6>>6\n#### 1,234,567"}) + "\n"
                 + json.dumps({"question": "And?", "answer": "nothing here ####"}) + "\n")
    lb = load_benchmark(f"gsm8k={f}")
    assert [p.answer for p in lb.problems] == ["1234567"]
    assert lb.problems[0].id == "gsm8k-0"
    assert "nothing after '####'" in lb.bad_rows[0].reason


def test_tiny_benchmark_is_the_heldout_split_with_raw_text() -> None:
    from evaluation.tiny_task import expression_of, make_split, split_of

    lb = load_benchmark("tiny", limit=12)
    rows = make_split("heldout", 12)
    assert [p.text for p in lb.problems] == [r["problem"] for r in rows]  # no instruction, no template
    assert [p.answer for p in lb.problems] == [r["answer"] for r in rows]
    assert all(split_of(expression_of(p.text)) == "heldout" for p in lb.problems)
    assert lb.benchmark.chat is False


def test_parse_hub() -> None:
    from evaluation.data import HubSource, parse_hub

    assert parse_hub("hub:Idavidrein/gpqa:gpqa_diamond@train") == HubSource("Idavidrein/gpqa", "gpqa_diamond", "train")
    assert parse_hub("openai/gsm8k:main") == HubSource("openai/gsm8k", "main", "test")
    assert str(parse_hub("hub:a/b@dev")) == "hub:a/b@dev"
    with pytest.raises(BenchmarkDataError, match="not a hub dataset id"):
        parse_hub("hub:nope")


# rows as the default hub sets lay them out (column names from their dataset cards)
HUB_ROWS = {
    "math500": [{"problem": "P?", "solution": "s", "answer": "\\frac12", "subject": "Algebra", "level": 3,
                 "unique_id": "test/algebra/1.json"}],
    "aime24": [{"id": 60, "problem": "P?", "solution": "s", "answer": "204", "url": "u", "year": "2024"}],
    "aime25": [{"problem": "P?", "answer": "70", "id": "0"}],
    "gsm8k": [{"question": "P?", "answer": "3 * 5 = <<3*5=15>>15\n#### 1,015"}],
    "gpqa_diamond": [{"Question": "P?", "Correct Answer": "yes", "Incorrect Answer 1": "no",
                      "Incorrect Answer 2": "maybe", "Incorrect Answer 3": "never", "Record ID": "recX",
                      "High-level domain": "Physics"}],
}
HUB_EXPECT = {"math500": ("test/algebra/1.json", "\\frac12", {"subject": "Algebra", "level": 3}),
              "aime24": ("60", "204", {}), "aime25": ("0", "70", {}), "gsm8k": ("gsm8k-0", "1015", {}),
              "gpqa_diamond": ("recX", None, {"domain": "Physics"})}


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_default_hub_layouts_map_to_problems(monkeypatch, name: str) -> None:
    import evaluation.benchmarks as eb

    asked = []

    def fake_read_hub(src, hint=""):
        asked.append(src)
        return [{**r, "where": f"{src}[{i}]"} for i, r in enumerate(HUB_ROWS[name])]

    monkeypatch.setattr(eb, "read_hub", fake_read_hub)
    lb = load_benchmark(name)
    assert asked == [BENCHMARKS[name].hub] and lb.source == str(BENCHMARKS[name].hub)
    (p,) = lb.problems
    pid, answer, meta = HUB_EXPECT[name]
    assert p.id == pid and p.text.startswith("P?")
    if answer is not None:
        assert p.answer == answer
    else:
        assert p.meta["choices"]["ABCD".index(p.answer)] == "yes"
    assert {k: v for k, v in p.meta.items() if k != "choices"} == meta
    # an explicit hub source for a benchmark goes to the hub too
    load_benchmark(f"{name}=hub:someone/copy:cfg@dev")
    assert str(asked[-1]) == "hub:someone/copy:cfg@dev"
