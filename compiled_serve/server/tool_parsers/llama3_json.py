"""Llama 3.x JSON tool calls: the reply *is* the call, `{"name": ..., "parameters": {...}}`,
optionally after `<|python_tag|>`; several calls are separated by `;`."""

from __future__ import annotations

from compiled_serve.server.tool_parsers.base import ToolParser, scan_separated
from compiled_serve.server.tool_parsers.json_scan import PartialCall, skip_whitespace
from compiled_serve.tool_prompt import LLAMA3_JSON_FORMAT

_PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    prompt_format = LLAMA3_JSON_FORMAT

    def find_calls(self, text: str) -> tuple[int, int] | None:
        start = skip_whitespace(text, 0)
        if text.startswith(_PYTHON_TAG, start):
            return start, start + len(_PYTHON_TAG)
        return (start, start) if text.startswith("{", start) else None

    def held_back(self, text: str) -> int:
        # Until the first non-blank characters show whether the reply opens with a call.
        rest = text[skip_whitespace(text, 0):]
        return len(text) if _PYTHON_TAG.startswith(rest) else 0

    def scan_calls(self, text: str, pos: int) -> list[PartialCall]:
        return scan_separated(text, pos, ";")
