"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any content.

`[TOOL_CALLS]` is a special token, so the endpoint keeps special tokens in the text when this
parser is active. (The v11 `[TOOL_CALLS]name[ARGS]{...}` layout is not read.)"""

from __future__ import annotations

from compiled_serve.server.tool_parsers.base import MarkedToolParser, scan_separated
from compiled_serve.server.tool_parsers.json_scan import PartialCall, skip_whitespace
from compiled_serve.tool_prompt import MISTRAL_FORMAT


class MistralToolParser(MarkedToolParser):
    name = "mistral"
    prompt_format = MISTRAL_FORMAT
    marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def scan_calls(self, text: str, pos: int) -> list[PartialCall]:
        pos = skip_whitespace(text, pos)
        if text.startswith("[", pos):
            return scan_separated(text, pos + 1, ",")
        return scan_separated(text, pos, ",")  # a bare object (or several) without the brackets
