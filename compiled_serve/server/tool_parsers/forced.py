"""The output of a forced tool choice (`required` or a named function): the grammar makes the
model write a JSON array of `{"name": ..., "arguments": {...}}` objects and nothing else
(schema.py builds that grammar's schema), whatever the configured parser's own syntax."""

from __future__ import annotations

from compiled_serve.server.tool_parsers.base import ToolParser, scan_separated
from compiled_serve.server.tool_parsers.json_scan import PartialCall, skip_whitespace
from compiled_serve.tool_prompt import HERMES_FORMAT


class ForcedCallParser(ToolParser):
    name = "forced"
    prompt_format = HERMES_FORMAT  # unused: the grammar, not the prompt, fixes the syntax

    def find_calls(self, text: str) -> tuple[int, int] | None:
        start = skip_whitespace(text, 0)
        return (start, start + 1) if text.startswith("[", start) else None

    def held_back(self, text: str) -> int:
        return len(text) if not text.strip() else 0

    def scan_calls(self, text: str, pos: int) -> list[PartialCall]:
        return scan_separated(text, pos, ",")
