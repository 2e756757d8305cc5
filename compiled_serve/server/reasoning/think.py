"""`<think>...</think>` reasoning, split from the answer; a pure function in two modes.

`split(text)` is final. `split_partial(text)` gives prefixes that can no longer change
(a trailing piece that may still become a tag is held back), so a stream sends differences
and the pieces join into the final split.

- `deepseek_r1`: the template opens `<think>` in the prompt, so everything up to `</think>`
  is reasoning (an opening tag in the output is dropped); with no `</think>` at all, the whole
  output is reasoning (the model was cut off while thinking).
- `qwen3`: reasoning only when the output opens with `<think>`; otherwise it is all content
  (thinking switched off), and a stray `</think>` is content too.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiled_serve.server.tool_parsers.base import held_back

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None  # None: the output has no reasoning part
    content: str


class ThinkReasoningParser:
    def __init__(self, name: str, implicit_start: bool):
        self.name = name
        self._implicit_start = implicit_start  # deepseek_r1: the prompt already opened <think>

    def _body_start(self, text: str) -> int | None:
        if text.startswith(START):
            return len(START)
        return 0 if self._implicit_start else None

    def split(self, text: str) -> ReasoningSplit:
        start = self._body_start(text)
        if start is None:
            return ReasoningSplit(None, text)
        end = text.find(END, start)
        if end < 0:
            return ReasoningSplit(text[start:], "")
        return ReasoningSplit(text[start:end], text[end + len(END):])

    def split_partial(self, text: str) -> ReasoningSplit:
        if START.startswith(text):
            return ReasoningSplit("", "")  # may still become the opening tag
        start = self._body_start(text)
        if start is None:
            return ReasoningSplit(None, text)
        end = text.find(END, start)
        if end < 0:
            return ReasoningSplit(text[start: len(text) - held_back(text[start:], END)], "")
        return ReasoningSplit(text[start:end], text[end + len(END):])


REASONING_PARSERS: dict[str, ThinkReasoningParser] = {
    "deepseek_r1": ThinkReasoningParser("deepseek_r1", implicit_start=True),
    "qwen3": ThinkReasoningParser("qwen3", implicit_start=False),
}
