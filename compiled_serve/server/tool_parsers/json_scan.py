"""Reading a tool call's JSON object while it is still being generated.

The model writes `{"name": "f", "arguments": {...}}` one token at a time. `scan_call` reads
as much of such an object as is there: the name once its string is complete, and the
arguments' raw text so far. That raw text only ever grows into the final arguments text
(an object value ends exactly at its closing brace), so a stream can send it in fragments
and the fragments join into what the non-streamed parse returns.

Everything is decoded with `json` (never `eval`): model output is untrusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()
ARGUMENT_KEYS = ("arguments", "parameters")  # hermes/mistral say arguments, llama3 parameters


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


@dataclass(frozen=True)
class PartialCall:
    """A call as far as it is written. `arguments` is a prefix of the final arguments text;
    `complete`: the object is closed and is a valid call (then `arguments` is final)."""

    name: str | None
    arguments: str | None  # None until the arguments key has been seen
    complete: bool


def _decode_value(text: str, pos: int) -> tuple[object, int] | None:
    """The JSON value at `pos` and where it ends; None while it may still be incomplete."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except (json.JSONDecodeError, RecursionError):
        return None
    if end == len(text) and text[pos] in "-0123456789":
        return None  # a number at the very end may still gain digits
    return value, end


def _final_arguments(value: object, raw: str) -> str | None:
    """The arguments text of a finished call: the raw object text as generated, or the content
    of a string that holds a JSON object (some models quote their arguments)."""
    if isinstance(value, dict):
        return raw
    if isinstance(value, str):
        try:
            return value if isinstance(json.loads(value), dict) else None
        except (ValueError, RecursionError):
            return None
    return None


def scan_call(text: str, pos: int) -> tuple[PartialCall, int | None]:
    """Reads the object that opens at text[pos] == '{'. Returns the call so far and the index
    after its closing brace (None while the object is unfinished or not a call)."""
    name: str | None = None
    arguments: str | None = None
    complete_arguments: str | None = None
    pos = skip_whitespace(text, pos + 1)
    closed = pos < len(text) and text[pos] == "}"
    while not closed:
        key = _decode_value(text, pos) if pos < len(text) and text[pos] == '"' else None
        if key is None:
            break
        pos = skip_whitespace(text, key[1])
        if pos >= len(text) or text[pos] != ":":
            break
        start = skip_whitespace(text, pos + 1)
        if start >= len(text):
            break
        value = _decode_value(text, start)
        if key[0] in ARGUMENT_KEYS:
            # An object's raw text so far is a prefix of its final text; any other value waits.
            raw = text[start: value[1]] if value is not None else text[start:]
            arguments = raw if text[start] == "{" else ""
            if value is not None:
                complete_arguments = _final_arguments(value[0], raw)
        if value is None:
            break
        if key[0] == "name" and isinstance(value[0], str):
            name = value[0]
        pos = skip_whitespace(text, value[1])
        if pos < len(text) and text[pos] == "}":
            closed = True
        elif pos < len(text) and text[pos] == ",":
            pos = skip_whitespace(text, pos + 1)
        else:
            break
    if not closed:
        return PartialCall(name, arguments, False), None
    if not name or complete_arguments is None:
        return PartialCall(None, None, False), None  # closed, but not a call
    return PartialCall(name, complete_arguments, True), pos + 1
