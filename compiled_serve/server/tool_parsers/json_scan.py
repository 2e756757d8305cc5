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
import re
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


_NUMBER_PREFIX = re.compile(r"-|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_ESCAPES = '"\\/bfnrt'


def json_prefix_length(text: str, start: int) -> int:
    """How many characters from `start` some text could extend into one JSON value (they stop
    at the first character no JSON could have there, or after the value closes). A stream sends
    an unfinished call's arguments only this far: never a Python literal, a stray tag, or text
    past a broken object."""
    stack: list[str] = []  # open containers: "{" or "["
    state, i, n = "value", start, len(text)
    while i < n:
        if state == "after" and not stack:
            return i - start  # the value is closed
        c = text[i]
        if state in ("value", "value_or_end", "key_or_end", "key", "colon", "after") and c in _WHITESPACE:
            i += 1
            continue
        if state in ("value", "value_or_end"):
            if state == "value_or_end" and c == "]":
                stack.pop()
                state = "after"
            elif c in "{[":
                stack.append(c)
                state = "key_or_end" if c == "{" else "value_or_end"
            elif c == '"':
                state = "string"
            elif c == "-" or c.isdigit():
                end = i
                while end < n and text[end] in "+-.eE0123456789":
                    end += 1
                number = text[i:end]
                if end == n or not _NUMBER.fullmatch(number):  # at the end it may still grow
                    good = next(k for k in range(len(number), -1, -1) if k == 0 or _NUMBER_PREFIX.fullmatch(number[:k]))
                    return i + good - start
                i, state = end, "after"
                continue
            elif c in _LITERALS:
                word = _LITERALS[c]
                written = text[i: i + len(word)]
                if not word.startswith(written):
                    return i + next(k for k in range(len(written)) if written[k] != word[k]) - start
                if len(written) < len(word):
                    return n - start
                i, state = i + len(word), "after"
                continue
            else:
                return i - start
        elif state in ("key_or_end", "key"):
            if state == "key_or_end" and c == "}":
                stack.pop()
                state = "after"
            elif c == '"':
                state = "key_string"
            else:
                return i - start
        elif state == "colon":
            if c != ":":
                return i - start
            state = "value"
        elif state == "after":
            if c == ",":
                state = "key" if stack[-1] == "{" else "value"
            elif c == "}" and stack[-1] == "{" or c == "]" and stack[-1] == "[":
                stack.pop()
            else:
                return i - start
        elif state in ("string", "key_string"):
            if c == "\\":
                if i + 1 < n and text[i + 1] not in _ESCAPES + "u":
                    return i - start
                if i + 1 < n and text[i + 1] == "u":
                    hex_digits = text[i + 2: i + 6]
                    if not all(h in "0123456789abcdefABCDEF" for h in hex_digits):
                        return i - start
                    i += 2 + len(hex_digits)
                    continue
                i += 2
                continue
            if c == '"':
                state = "colon" if state == "key_string" else "after"
            elif ord(c) < 0x20:
                return i - start
        i += 1
    return n - start


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
            # An object's raw text so far is a prefix of its final text (as far as it is JSON at
            # all); any other value waits.
            raw = text[start: value[1]] if value is not None else text[start: start + json_prefix_length(text, start)]
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
