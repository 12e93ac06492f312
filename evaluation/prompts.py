"""Turning a problem into prompt token ids, per model family.

``style``:

* ``auto`` (default): the tokenizer's chat template when it has one (instruct and reasoning models: Qwen, Llama,
  DeepSeek-R1 distills), else ``plain``;
* ``chat``: require a chat template (error if the tokenizer has none);
* ``plain``: the problem text followed by a blank line, tokenised with the tokenizer's own special tokens (e.g. BOS);
  for base models.

Benchmarks with ``chat=False`` (the tiny task, whose model is trained on the bare problem text) always use their raw
text, whatever the style. The problem text already carries the benchmark's instruction (see
:mod:`evaluation.benchmarks`); no system prompt is added, as DeepSeek-R1's usage notes recommend.
"""
from __future__ import annotations

from typing import Any

PROMPT_STYLES = ("auto", "chat", "plain")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer: Any, text: str, *, chat: bool = True, style: str = "auto") -> tuple[str, bool]:
    """The prompt string and whether it already holds the special tokens (True for chat-templated prompts)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r} is not one of {', '.join(PROMPT_STYLES)}")
    if not chat:
        return text, False
    use_chat = style == "chat" or (style == "auto" and has_chat_template(tokenizer))
    if use_chat:
        if not has_chat_template(tokenizer):
            raise ValueError("prompt style 'chat' needs a tokenizer with a chat template; this one has none "
                             "(use style 'plain' or 'auto')")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return rendered, True
    return f"{text}\n\n", False


def encode_prompt(tokenizer: Any, text: str, *, chat: bool = True, style: str = "auto") -> list[int]:
    """Token ids of the prompt for one problem (see the module docstring for ``style``)."""
    rendered, templated = prompt_text(tokenizer, text, chat=chat, style=style)
    ids = tokenizer(rendered, add_special_tokens=not templated)["input_ids"]
    if not ids:
        raise ValueError(f"the prompt {rendered[:60]!r} encodes to no tokens")
    return list(ids)
