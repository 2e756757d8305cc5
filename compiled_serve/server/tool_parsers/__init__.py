"""Tool-call parsers, chosen with `--tool-call-parser`: pure functions of the model's text
(base.py) plus one streaming adapter (streaming.py). A new syntax is a ToolParser subclass
registered here."""

from __future__ import annotations

from compiled_serve.server.tool_parsers.base import ToolCall, ToolParse, ToolParser
from compiled_serve.server.tool_parsers.forced import ForcedCallParser
from compiled_serve.server.tool_parsers.hermes import HermesToolParser
from compiled_serve.server.tool_parsers.llama3_json import Llama3JsonToolParser
from compiled_serve.server.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}

__all__ = ["TOOL_PARSERS", "ForcedCallParser", "ToolCall", "ToolParse", "ToolParser"]
