"""The tiny offline default: task splits, the character tokenizer, and the tiny Qwen2 checkpoint."""
from __future__ import annotations

import re
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.tiny_task import expression_of, split_of
from pipeline.config import TinyModelConfig
from pipeline.tiny import build_tiny_model, build_tokenizer, create_tiny_checkpoint, make_split

SMALL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def train_rows():
    return make_split("train", 4000, seed=0)


@pytest.fixture(scope="module")
def heldout_rows():
    return make_split("heldout", 500, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ------------------------------------------------------------------------------------------------------------ task


def test_splits_are_deterministic_and_extend_each_other():
    assert make_split("train", 300, seed=3) == make_split("train", 300, seed=3)
    assert make_split("heldout", 50, seed=3) == make_split("heldout", 80, seed=3)[:50]
    assert make_split("train", 50, seed=3) != make_split("train", 50, seed=4)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_train_and_heldout_are_disjoint_whatever_the_seed(seed, heldout_rows):
    train = {expression_of(r["problem"]) for r in make_split("train", 3000, seed=seed)}
    held = {expression_of(r["problem"]) for r in heldout_rows} | {
        expression_of(r["problem"]) for r in make_split("heldout", 300, seed=seed)}
    assert not train & held
    assert all(split_of(e) == "train" for e in train) and all(split_of(e) == "heldout" for e in held)


def test_rows_are_unique_within_a_split(train_rows, heldout_rows):
    for rows in (train_rows, heldout_rows):
        assert len({r["problem"] for r in rows}) == len(rows)
        assert len({r["id"] for r in rows}) == len(rows)
        assert all(set(r) == {"id", "problem", "answer", "solution"} for r in rows)


def test_answers_match_python_eval(train_rows, heldout_rows):
    for r in train_rows + heldout_rows:
        expression = expression_of(r["problem"])
        assert re.fullmatch(r"\d([+-]\d)+", expression), expression
        assert int(r["answer"]) == eval(expression)  # noqa: S307 - our own digits and +/- only


def test_solutions_are_correct_chains_ending_in_the_boxed_answer(train_rows, heldout_rows):
    for r in train_rows + heldout_rows:
        *steps, last = r["solution"].split("\n")
        assert last == f"\\boxed{{{r['answer']}}}"
        assert re.findall(r"\\boxed\{([^{}]*)\}", r["solution"])[-1] == r["answer"]
        running = None
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307
            if running is not None:
                assert lhs.startswith(running)  # each step starts from the previous result
            running = rhs
        assert running == r["answer"]


def test_the_project_math_reward_grades_reference_solutions_correct(heldout_rows):
    from lampo.rewards.math_answer import extract_answer, is_equivalent

    for r in heldout_rows[:50]:
        assert extract_answer(r["solution"]) == r["answer"]
        assert is_equivalent(extract_answer(r["solution"]), r["answer"])[0]
        wrong = r["solution"].replace(f"\\boxed{{{r['answer']}}}", f"\\boxed{{{int(r['answer']) + 1}}}")
        assert not is_equivalent(extract_answer(wrong), r["answer"])[0]



def test_the_default_shape_is_unchanged_by_the_ops_option():
    """Three operations stays the task every figure in the README was measured on: same rows, same ids."""
    assert make_split("heldout", 40, seed=0, ops=3) == make_split("heldout", 40, seed=0)
    assert make_split("train", 5, seed=1234)[0]["id"] == "tiny-train-1234-00000"


def test_the_longer_variant_has_five_correct_steps_and_its_own_disjoint_splits():
    train, held = make_split("train", 2000, seed=0, ops=5), make_split("heldout", 300, seed=0, ops=5)
    assert held == make_split("heldout", 500, seed=0, ops=5)[:300]
    for r in train + held:
        expr = expression_of(r["problem"])
        assert len(re.findall(r"[+-]", expr[1:])) == 5 and eval(expr) == int(r["answer"])  # noqa: S307
        lines = r["solution"].split("\n")
        assert len(lines) == 6 and lines[-1] == f"\\boxed{{{r['answer']}}}"
        assert r["id"].startswith("tiny5-")
    assert not {expression_of(r["problem"]) for r in train} & {expression_of(r["problem"]) for r in held}
    assert all(split_of(expression_of(r["problem"])) == "heldout" for r in held)
    for bad in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match="ops="):
            make_split("train", 3, ops=bad)


def test_the_tiny5_benchmark_and_data_tiny_ops_read_the_same_variant():
    from evaluation.benchmarks import load_benchmark
    from pipeline.config import ConfigError, load_config
    from pipeline.data import load_rows

    lb = load_benchmark("tiny5", limit=30)
    assert [p.text for p in lb.problems] == [r["problem"] for r in make_split("heldout", 30, seed=0, ops=5)]
    rows = load_rows(load_config(None, ["data.tiny_ops=5", "data.tiny_train_size=20"]), "train")
    assert rows == make_split("train", 20, seed=1234, ops=5)
    with pytest.raises(ConfigError, match="data.tiny_ops=9"):
        load_config(None, ["data.tiny_ops=9"])


def test_the_tiny_benchmark_holds_as_many_problems_as_the_heldout_default():
    """The task module (evaluation side) and the config schema (a leaf that imports no project module) each state the
    held-out default; they must agree, and the ``tiny`` benchmark without a limit holds that many problems."""
    from evaluation.benchmarks import load_benchmark
    from evaluation.tiny_task import TINY_HELDOUT_DEFAULT
    from pipeline.config import DataConfig

    assert DataConfig().tiny_heldout_size == TINY_HELDOUT_DEFAULT == 200
    lb = load_benchmark("tiny")
    assert [p.text for p in lb.problems] == [r["problem"] for r in make_split("heldout", TINY_HELDOUT_DEFAULT)]


def test_pipeline_tiny_task_reexports_the_evaluation_task():
    import evaluation.tiny_task as task
    import pipeline.tiny.task as reexport

    assert set(reexport.__all__) <= set(vars(task))
    assert all(getattr(reexport, name) is getattr(task, name) for name in reexport.__all__)
    assert make_split is task.make_split


@pytest.mark.parametrize("split", ["test", "validation", "", "Train"])
def test_unknown_split_is_refused_with_the_choices(split):
    with pytest.raises(ValueError, match="train, heldout"):
        make_split(split, 3)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        make_split("train", -1)
    with pytest.raises(ValueError, match="fewer"):
        make_split("heldout", 10**6)
    assert make_split("heldout", 0) == []


def test_responses_stay_short(tok, train_rows):
    """RL rollouts are budgeted at 48 new tokens; a reference response (solution + eos) must fit well within it."""
    assert max(len(tok.encode(r["solution"])) + 1 for r in train_rows) <= 40


# ------------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_task_text(tok, train_rows):
    for r in train_rows[:500]:
        for text in (r["problem"], r["solution"], r["problem"] + r["solution"]):
            assert tok.decode(tok.encode(text)) == text
    # one step per character, except the answer marker, which is a single token
    sol = train_rows[0]["solution"]
    assert len(tok.encode(sol)) == len(sol) - len("\\boxed{") + 1
    assert tok.convert_ids_to_tokens(tok.encode("\\boxed{5}")) == ["\\boxed{", "5", "}"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_round_trips_any_text_without_unk(text):
    """Byte-level symbols cover every character, so nothing is unknown (non-ASCII takes one token per UTF-8 byte)."""
    text = unicodedata.normalize("NFC", text)
    ids = _TOK.encode(text)
    assert _TOK.decode(ids) == text
    if not any(t in text for t in ("<pad>", "<eos>", "<bos>", "<unk>")):
        assert _TOK.unk_token_id not in ids
        assert len(ids) == len(text.encode("utf-8")) - len("\\boxed{") * text.count("\\boxed{") + text.count("\\boxed{")


_TOK = build_tokenizer()


def test_non_ascii_characters_do_not_crash(tok):
    ids = tok.encode("1+é=€")
    assert len(ids) == 3 + 2 + 3  # 1, +, = are one byte each; é two bytes; € three
    assert tok.decode(ids) == "1+é=€"


def test_tokenizer_is_deterministic_and_has_the_special_tokens(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    assert len({tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert tok.encode("What is 1+2?") == again.encode("What is 1+2?")
    assert tok.encode("1+2", add_special_tokens=True) == tok.encode("1+2", add_special_tokens=False)


def test_tokenizer_saves_and_loads_with_autotokenizer(tmp_path, tok, heldout_rows):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    for r in heldout_rows[:50]:
        assert loaded.encode(r["solution"]) == tok.encode(r["solution"])
        assert loaded.decode(loaded.encode(r["solution"])) == r["solution"]
    batch = loaded([heldout_rows[0]["problem"], "1"], padding=True)
    assert batch["input_ids"][1][0] == tok.pad_token_id  # prompts pad on the left for generation


# ----------------------------------------------------------------------------------------------------------- model


def test_model_shape_follows_the_config_and_the_seed(tok):
    from transformers import Qwen2ForCausalLM

    a, b, c = (build_tiny_model(SMALL, tok, seed=s) for s in (5, 5, 6))
    assert isinstance(a, Qwen2ForCausalLM) and a.dtype == torch.float32
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2 and a.config.hidden_size == 32
    assert a.config.eos_token_id == tok.eos_token_id and a.config.pad_token_id == tok.pad_token_id
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_building_leaves_the_global_rng_alone(tok):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_model(SMALL, tok, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_bad_head_layout_is_refused(tok):
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(TinyModelConfig(hidden_size=30, num_heads=4), tok, seed=0)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_tiny_model(TinyModelConfig(num_heads=4, num_kv_heads=3), tok, seed=0)


def test_checkpoint_loads_with_auto_classes_and_identical_logits(tmp_path, tok, heldout_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = create_tiny_checkpoint(tmp_path / "ckpt", SMALL, seed=11)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(path)
    fresh = build_tiny_model(SMALL, tok, seed=11)
    text = heldout_rows[0]["problem"] + heldout_rows[0]["solution"]
    ids = torch.tensor([loaded_tok.encode(text)])
    assert ids.tolist() == [tok.encode(text)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_checkpoint_refuses_to_overwrite(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        create_tiny_checkpoint(tmp_path / "ckpt", SMALL, seed=0)
