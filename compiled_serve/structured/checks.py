"""Checks on a spec before any grammar library sees it: cheap, bounded, and each a 400 naming the
field. The grammar backend's own limits (fuel, lexer states, grammar size) are the second line.

- a JSON schema must be one (its draft's metaschema, through jsonschema), at most
  MAX_SCHEMA_DEPTH containers deep (a schema nested 200 deep is refused before any recursion)
  and at most MAX_SPEC_CHARS of JSON text (an enum of 100,000 strings is refused here);
- regexes, grammars and choices are bounded in size too, and a regex (or a schema `pattern`)
  whose nested counted repetitions multiply past MAX_REGEX_REPETITION (`(a{1000}){1000}`: its
  automaton is that large, and llguidance's lazy lexer would only hit it mid-stream) is refused.
"""

from __future__ import annotations

import json
import re
import re._parser as sre_parse  # Python's own regex parser: close enough to count repetitions
from typing import Any, NoReturn

import jsonschema

from compiled_serve.errors import InvalidParameterError

MAX_SCHEMA_DEPTH = 48  # JSON containers (objects and arrays) inside one another
MAX_SPEC_CHARS = 200_000  # JSON text of a schema, a regex, a grammar or all choices together
MAX_REGEX_REPETITION = 100_000  # product of nested {m,n} counts
_REPEATS = (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None))
_MAX_MESSAGE_CHARS = 200


def _fail(field: str, message: str) -> NoReturn:
    raise InvalidParameterError(field, message)


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of dicts and lists (iterative: no recursion on hostile input); stops past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json_schema(schema: Any, field: str) -> None:
    """Bounded size and depth, then the schema against its draft's metaschema (2020-12 unless
    `$schema` names another), formats included (a `pattern` must be a regex)."""
    if json_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        _fail(field, f"JSON schema is nested too deeply (more than {MAX_SCHEMA_DEPTH} levels)")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError):
        _fail(field, "a JSON schema must be JSON")
    if size > MAX_SPEC_CHARS:
        _fail(field, f"JSON schema is too large ({size} characters; at most {MAX_SPEC_CHARS})")
    validator = jsonschema.Draft202012Validator
    # validator_for needs a string `$schema`; the 2020-12 metaschema refuses anything else below.
    if isinstance(schema, dict) and isinstance(schema.get("$schema", ""), str):
        validator = jsonschema.validators.validator_for(schema, default=validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = exc.json_path if exc.json_path != "$" else "the schema"
        message = exc.message if len(exc.message) <= _MAX_MESSAGE_CHARS else exc.message[:_MAX_MESSAGE_CHARS] + "..."
        _fail(field, f"not a valid JSON schema: {message} (at {where})")
    except RecursionError:
        _fail(field, "JSON schema is nested too deeply")
    for pattern in _patterns(schema):
        if regex_repetition(pattern) > MAX_REGEX_REPETITION:
            _fail(field, f"a pattern repeats too much (nested counts multiply past {MAX_REGEX_REPETITION})")


def regex_repetition(pattern: str) -> int:
    """The largest product of nested bounded repetition counts; 0 when Python cannot parse it
    (Rust-only syntax: the backend judges it alone)."""
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return 0
    worst, stack = 1, [(parsed, 1)]
    while stack:
        items, factor = stack.pop()
        for op, av in items:
            if op in _REPEATS:
                low, high, sub = av
                count = high if high != sre_parse.MAXREPEAT else max(low, 1)
                stack.append((sub, factor * max(count, 1)))
                worst = max(worst, factor * max(count, 1))
            elif op == sre_parse.SUBPATTERN:
                stack.append((av[-1], factor))
            elif op == sre_parse.BRANCH:
                stack.extend((branch, factor) for branch in av[1])
    return worst


def check_regex(pattern: str, field: str) -> None:
    check_text_size(pattern, field, "the regex")
    if regex_repetition(pattern) > MAX_REGEX_REPETITION:
        _fail(field, f"the regex repeats too much (nested counts multiply past {MAX_REGEX_REPETITION})")


def _patterns(schema: Any) -> list[str]:
    """Every `pattern` string and `patternProperties` key in a (depth-checked) schema."""
    found, stack = [], [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("pattern"), str):
                found.append(item["pattern"])
            if isinstance(item.get("patternProperties"), dict):
                found.extend(k for k in item["patternProperties"] if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def check_text_size(text: str, field: str, what: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        _fail(field, f"{what} is too large ({len(text)} characters; at most {MAX_SPEC_CHARS})")


def check_choices(choices: list[str], field: str) -> None:
    check_text_size("".join(choices), field, "the list of choices")
