"""Forced output lengths of the benchmarks (`generation.force_length=text_layer`, `jobs/benchmark.py`):
a page generates exactly the token count of its PDF text layer plus FORCED_TOKENS_PER_BLOCK per
non-empty text block, or FORCED_NO_TEXT_TOKENS without a text layer (< MIN_TEXT_CHARS non-space
chars), capped so prompt + output fit the model length, at least 1.

The renderer only counts the text blocks (`text_blocks`, no tokenizer in the PDF child); the OCR
stage, which holds the tokenizer and knows the prompt, computes the length (`forced_from_text`).
The engine benchmark uses `forced_length` on a PyMuPDF page: the same rule, one home.
"""

from __future__ import annotations

from typing import Any

MIN_TEXT_CHARS = 20  # "has a text layer" = at least this many non-whitespace extractable chars
FORCED_NO_TEXT_TOKENS = 1000  # forced output length of a page without a text layer
FORCED_TOKENS_PER_BLOCK = 20  # added per non-empty text block: markup, boxes, blank lines


def text_blocks(page: Any) -> int:
    """Non-empty text blocks of a PyMuPDF page."""
    return sum(1 for b in page.get_text("blocks") if b[6] == 0 and b[4].strip())


def cap_forced_length(target: int, prompt_len: int, max_model_len: int) -> int:
    """`target` capped so prompt + output fit `max_model_len`, at least 1. Capping in two steps
    (first with prompt_len 0, then the real one) gives the same value as capping once."""
    return max(1, min(target, max_model_len - prompt_len))


def forced_from_text(
    text: str | None, blocks: int, tokenizer: Any, prompt_len: int, max_model_len: int
) -> int:
    """The forced length of a page from its text layer and text-block count; `tokenizer` has
    `.encode(str) -> ids`."""
    text = text or ""
    if len("".join(text.split())) >= MIN_TEXT_CHARS:
        target = len(tokenizer.encode(text)) + FORCED_TOKENS_PER_BLOCK * blocks
    else:
        target = FORCED_NO_TEXT_TOKENS
    return cap_forced_length(target, prompt_len, max_model_len)


def forced_length(
    page: Any, tokenizer: Any, prompt_len: int, max_model_len: int, text: str | None = None
) -> int:
    """The forced length of a PyMuPDF page (`text`: its `get_text("text")` if the caller has it)."""
    text = page.get_text("text") if text is None else text
    return forced_from_text(text, text_blocks(page), tokenizer, prompt_len, max_model_len)
