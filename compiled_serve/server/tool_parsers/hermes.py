"""Qwen / Hermes: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call."""

from __future__ import annotations

from compiled_serve.server.tool_parsers.base import MarkedToolParser
from compiled_serve.server.tool_parsers.json_scan import PartialCall, scan_call, skip_whitespace
from compiled_serve.tool_prompt import HERMES_FORMAT

_CLOSE = "</tool_call>"


class HermesToolParser(MarkedToolParser):
    name = "hermes"
    prompt_format = HERMES_FORMAT
    marker = "<tool_call>"

    def scan_calls(self, text: str, pos: int) -> list[PartialCall]:
        calls: list[PartialCall] = []
        while True:
            pos = skip_whitespace(text, pos)
            if pos >= len(text) or text[pos] != "{":
                return calls
            call, end = scan_call(text, pos)
            calls.append(call)
            if end is None:
                return calls
            # The closing tag may be missing at the very end (the model stopped on it).
            pos = skip_whitespace(text, end)
            if text.startswith(_CLOSE, pos):
                pos = skip_whitespace(text, pos + len(_CLOSE))
            if not text.startswith(self.marker, pos):
                return calls
            pos += len(self.marker)
