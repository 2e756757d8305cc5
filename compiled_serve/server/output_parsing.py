"""One choice's text read as reasoning, content and tool calls (chat and the Responses API).

The reasoning parser runs first; the tool parser sees only the content it leaves. Streamed,
`ChoiceParser.update` takes the cumulative text and returns what is new; `finish` returns the
rest, so the pieces join into `parse_output` of the full text. Both read a finished text with
`parse_cut` (tool_parsers/base.py), whatever ended it (the token budget, EOS or a stop string
mid-call): a call the stream announced is a call in both answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from compiled_serve.server.reasoning import ThinkReasoningParser
from compiled_serve.server.tool_parsers import ToolCall, ToolParser
from compiled_serve.server.tool_parsers.streaming import ToolCallDelta, ToolCallStreamer, new_call_id


@dataclass(frozen=True)
class OutputParsers:
    """What reads a request's output: either parser may be absent."""

    reasoning: ThinkReasoningParser | None = None
    tools: ToolParser | None = None
    max_calls: int | None = None  # parallel_tool_calls=false: later calls are dropped


@dataclass(frozen=True)
class ParsedOutput:
    reasoning: str | None
    content: str
    calls: list[ToolCall]
    call_ids: list[str]


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def parse_output(parsers: OutputParsers, text: str, call_id: Callable[[], str] = new_call_id) -> ParsedOutput:
    reasoning, content = None, text
    if parsers.reasoning is not None:
        split = parsers.reasoning.split(text)
        reasoning, content = split.reasoning, split.content
    calls = []
    if parsers.tools is not None:
        parsed = parsers.tools.parse_cut(content)
        content, calls = parsed.content, parsed.calls[: parsers.max_calls]
    return ParsedOutput(reasoning, content, calls, [call_id() for _ in calls])


class ChoiceParser:
    def __init__(self, parsers: OutputParsers, call_id: Callable[[], str] = new_call_id):
        self._parsers = parsers
        self._tools = ToolCallStreamer(parsers.tools, call_id) if parsers.tools is not None else None
        self._reasoning_sent = 0
        self._content_sent = 0

    def _step(self, reasoning: str | None, content: str, final: bool) -> OutputDelta:
        delta = OutputDelta(reasoning=(reasoning or "")[self._reasoning_sent:])
        self._reasoning_sent += len(delta.reasoning)
        if self._tools is None:
            delta.content = content[self._content_sent:]
            self._content_sent += len(delta.content)
            return delta
        tools = self._tools.finish(content) if final else self._tools.update(content)
        limit = self._parsers.max_calls
        delta.content = tools.content
        delta.tool_calls = [call for call in tools.tool_calls if limit is None or call.index < limit]
        return delta

    def update(self, text: str) -> OutputDelta:
        if self._parsers.reasoning is None:
            return self._step(None, text, final=False)
        split = self._parsers.reasoning.split_partial(text)
        return self._step(split.reasoning, split.content, final=False)

    def finish(self, text: str) -> OutputDelta:
        if self._parsers.reasoning is None:
            return self._step(None, text, final=True)
        split = self._parsers.reasoning.split(text)
        return self._step(split.reasoning, split.content, final=True)

    @property
    def called(self) -> bool:
        return self._tools is not None and self._tools.called

    @property
    def call_ids(self) -> list[str]:
        return self._tools.call_ids[: self._parsers.max_calls] if self._tools is not None else []
