"""Prompt rendering per model family: chat template when there is one, plain otherwise, raw text for the tiny task."""
from __future__ import annotations

import pytest

from evaluation.benchmarks import load_benchmark
from evaluation.prompts import encode_prompt, prompt_text

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_tokenizer(char_tokenizer):
    char_tokenizer.chat_template = TEMPLATE
    return char_tokenizer


def test_auto_uses_the_chat_template_when_present(chat_tokenizer) -> None:
    ids = encode_prompt(chat_tokenizer, "What is 1+1?\nPlease reason.", style="auto")
    assert chat_tokenizer.decode(ids) == "<|user|>What is 1+1?\nPlease reason.\n<|assistant|>"


def test_auto_falls_back_to_plain_without_a_template(char_tokenizer) -> None:
    assert not getattr(char_tokenizer, "chat_template", None)
    assert prompt_text(char_tokenizer, "Q?", style="auto") == ("Q?\n\n", False)
    assert char_tokenizer.decode(encode_prompt(char_tokenizer, "Q?")) == "Q?\n\n"


def test_plain_style_ignores_a_template_and_chat_style_requires_one(chat_tokenizer, char_tokenizer) -> None:
    assert prompt_text(chat_tokenizer, "Q?", style="plain") == ("Q?\n\n", False)
    chat_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_prompt(char_tokenizer, "Q?", style="chat")
    with pytest.raises(ValueError, match="not one of"):
        encode_prompt(char_tokenizer, "Q?", style="fancy")


def test_tiny_task_prompt_is_the_raw_problem_whatever_the_style(chat_tokenizer) -> None:
    p = load_benchmark("tiny", limit=1).problems[0]
    for style in ("auto", "chat", "plain"):
        ids = encode_prompt(chat_tokenizer, p.text, chat=False, style=style)
        assert chat_tokenizer.decode(ids) == p.text == "What is 4+7-4-7?"


def test_math_prompt_carries_the_boxed_instruction(shared_data, chat_tokenizer) -> None:
    p = load_benchmark("aime24", data_dir=shared_data, limit=1).problems[0]
    text = chat_tokenizer.decode(encode_prompt(chat_tokenizer, p.text))
    assert text.startswith("<|user|>Every morning Aya")
    assert text.endswith("Please reason step by step, and put your final answer within \\boxed{}.\n<|assistant|>")
