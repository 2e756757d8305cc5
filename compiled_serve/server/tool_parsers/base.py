"""What a tool-call parser is: a pure function of the model's full text, in two modes.

`parse(text)` is the final answer: the content (text that is not a call) and the calls.
When nothing in the text is a valid call, the whole text is content, so a model that merely
mentions a marker loses nothing. `parse_partial(text)` reads an unfinished text: a content
prefix that can no longer change and the calls as far as they are written. The streaming
adapter (streaming.py) sends the difference between successive partial parses, then the
rest of the final one; a subclass only says where the calls start and how they are laid out.

`parse_cut(text)` is the final answer the endpoints give, streamed and not, for a text that
ended, whatever ended it: the token budget (finish_reason "length"), EOS or a stop string
(possibly mid-object: a model that stops inside its call), an abort. Every call a stream has
announced stays a call, the last one's arguments as far as they were written (possibly
unfinished JSON), as OpenAI returns a call cut by max_tokens. A stream cannot take back a call
it announced, so this is the one answer both paths can give; before any call's arguments start
the text is content, exactly as `parse` has it. `parse` stays the strict reading (only closed,
valid calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compiled_serve.server.tool_parsers.json_scan import PartialCall, scan_call, skip_whitespace
from compiled_serve.tool_prompt import ToolPromptFormat


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the JSON text of the arguments object, as the model wrote it


@dataclass(frozen=True)
class ToolParse:
    content: str
    calls: list[ToolCall]


@dataclass(frozen=True)
class PartialToolParse:
    content: str  # a prefix of the final content
    calls: list[PartialCall]


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def scan_separated(text: str, pos: int, separator: str) -> list[PartialCall]:
    """Calls laid out as `{...} SEP {...} ...` from `pos`; stops at the first thing that is not
    a call, an unfinished call included (it is the last one returned)."""
    calls: list[PartialCall] = []
    while True:
        pos = skip_whitespace(text, pos)
        if pos >= len(text) or text[pos] != "{":
            return calls
        call, end = scan_call(text, pos)
        calls.append(call)
        if end is None:
            return calls
        pos = skip_whitespace(text, end)
        if not text.startswith(separator, pos):
            return calls
        pos += len(separator)


def announced(calls: list[PartialCall]) -> list[ToolCall]:
    """The leading calls whose name and the start of whose arguments are written: what a stream
    announces (in order: a later call never shows before an earlier one)."""
    shown = []
    for call in calls:
        if not call.name or call.arguments is None:
            break
        shown.append(ToolCall(call.name, call.arguments))
    return shown


class ToolParser:
    """Subclasses set `name` and `prompt_format` and implement `find_calls`/`scan_calls`."""

    name: ClassVar[str]
    prompt_format: ClassVar[ToolPromptFormat]
    # Its marker is a special token that skip_special_tokens would remove from the text.
    needs_special_tokens: ClassVar[bool] = False

    def find_calls(self, text: str) -> tuple[int, int] | None:
        """(end of the content, start of the calls) when the text has entered its calls."""
        raise NotImplementedError

    def held_back(self, text: str) -> int:
        """Trailing characters that may still turn out to open the calls (not yet content)."""
        raise NotImplementedError

    def scan_calls(self, text: str, pos: int) -> list[PartialCall]:
        raise NotImplementedError

    def parse(self, text: str) -> ToolParse:
        found = self.find_calls(text)
        if found is not None:
            calls = [ToolCall(c.name, c.arguments) for c in self.scan_calls(text, found[1])
                     if c.complete and c.name and c.arguments is not None]
            if calls:
                return ToolParse(text[: found[0]], calls)
        return ToolParse(text, [])

    def parse_cut(self, text: str) -> ToolParse:
        found = self.find_calls(text)
        if found is not None:
            calls = announced(self.scan_calls(text, found[1]))
            if calls:
                return ToolParse(text[: found[0]], calls)
        return self.parse(text)

    def parse_partial(self, text: str) -> PartialToolParse:
        found = self.find_calls(text)
        if found is None:
            return PartialToolParse(text[: len(text) - self.held_back(text)], [])
        return PartialToolParse(text[: found[0]], self.scan_calls(text, found[1]))


class MarkedToolParser(ToolParser):
    """Calls opened by a marker (`<tool_call>`, `[TOOL_CALLS]`); the content is what precedes it."""

    marker: ClassVar[str]

    def find_calls(self, text: str) -> tuple[int, int] | None:
        at = text.find(self.marker)
        return None if at < 0 else (at, at + len(self.marker))

    def held_back(self, text: str) -> int:
        return held_back(text, self.marker)
