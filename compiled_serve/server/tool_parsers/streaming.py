"""The streaming adapter: any ToolParser, fed a growing text, gives OpenAI-style deltas.

Each call appears once with its id and name (when its arguments key has been seen, so a
closed object that turns out not to be a call has rarely been announced), then as argument
fragments. `finish` sends what the final parse adds, so the deltas join into exactly the
non-streamed parse (`parse_cut`, which the endpoints use for every finished text) of every
text, cut anywhere: by the token budget, by EOS or a stop string mid-call, or well-formed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from compiled_serve.server.tool_parsers.base import ToolParser, announced


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    index: int
    arguments: str
    id: str | None = None  # with the name, on the call's first delta only
    name: str | None = None


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)


class ToolCallStreamer:
    def __init__(self, parser: ToolParser, call_id: Callable[[], str] = new_call_id):
        self._parser = parser
        self._call_id = call_id
        self._content_sent = 0
        self._arguments_sent: list[int] = []
        self.call_ids: list[str] = []

    def _diff(self, content: str, calls: list[tuple[str, str]]) -> ParsedDelta:
        delta = ParsedDelta(content=content[self._content_sent:])
        self._content_sent = max(self._content_sent, len(content))
        for index, (name, arguments) in enumerate(calls):
            if index == len(self._arguments_sent):
                self.call_ids.append(self._call_id())
                self._arguments_sent.append(len(arguments))
                delta.tool_calls.append(ToolCallDelta(index, arguments, self.call_ids[index], name))
            elif len(arguments) > self._arguments_sent[index]:
                delta.tool_calls.append(ToolCallDelta(index, arguments[self._arguments_sent[index]:]))
                self._arguments_sent[index] = len(arguments)
        return delta

    def update(self, text: str) -> ParsedDelta:
        partial = self._parser.parse_partial(text)
        return self._diff(partial.content, [(c.name, c.arguments) for c in announced(partial.calls)])

    def finish(self, text: str) -> ParsedDelta:
        """The rest of the final parse (`parse_cut`: the answer for a text that ended, however)."""
        final = self._parser.parse_cut(text)
        return self._diff(final.content, [(c.name, c.arguments) for c in final.calls])

    @property
    def called(self) -> bool:
        return bool(self.call_ids)
