"""Request-time checks for structured-output specs (response_format, guided_*).

Guided decoding is not implemented yet. An invalid spec (a JSON schema that is not one, a
regex that does not compile) is a 400 naming the field; a valid spec is a 400 "not supported
yet" — never silently ignored, and never handed to the engine loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.protocol import SamplingFields

_TYPES = {"null", "boolean", "object", "array", "number", "string", "integer"}
_SCHEMA_KEYWORDS = ("additionalProperties", "items", "not", "if", "then", "else", "contains",
                    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_NON_NEGATIVE_INTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_MAX_DEPTH = 64


def _fail(field: str, message: str) -> None:
    raise InvalidParameterError(field, message)


def check_json_schema(schema: Any, field: str, depth: int = 0) -> None:
    """Structural JSON Schema (2020-12) check of the keywords whose shape is fixed."""
    if depth > _MAX_DEPTH:
        _fail(field, "JSON schema is nested too deeply")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        _fail(field, "a JSON schema must be an object or a boolean")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in _TYPES for k in kinds):
            _fail(field, f"'type' must be one of {sorted(_TYPES)} or a list of them")
    for key in _SCHEMA_KEYWORDS:
        if key in schema:
            value = schema[key]
            if key == "items" and isinstance(value, list):  # draft-07 tuple form
                for item in value:
                    check_json_schema(item, field, depth + 1)
            else:
                check_json_schema(value, field, depth + 1)
    for key in _SCHEMA_LISTS:
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                _fail(field, f"'{key}' must be a non-empty array of schemas")
            for item in schema[key]:
                check_json_schema(item, field, depth + 1)
    for key in _SCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], dict):
                _fail(field, f"'{key}' must be an object mapping names to schemas")
            for sub in schema[key].values():
                check_json_schema(sub, field, depth + 1)
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            _fail(field, "'required' must be an array of strings")
    if "enum" in schema and not isinstance(schema["enum"], list):
        _fail(field, "'enum' must be an array")
    for key in _NON_NEGATIVE_INTS:
        if key in schema:
            value = schema[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(field, f"'{key}' must be a non-negative integer")
    for key in _NUMBERS:
        if key in schema:
            value = schema[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                _fail(field, f"'{key}' must be a number")
    if "multipleOf" in schema and not schema["multipleOf"] > 0:
        _fail(field, "'multipleOf' must be > 0")
    if "pattern" in schema:
        check_regex(schema["pattern"], field)


def check_regex(pattern: Any, field: str) -> None:
    if not isinstance(pattern, str):
        _fail(field, "a regex must be a string")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        _fail(field, f"regex does not compile: {getattr(exc, 'msg', 'invalid pattern')}")


def validate_structured_output(request: SamplingFields) -> None:
    """Raises InvalidParameterError for every structured-output spec (invalid or not)."""
    spec_field: str | None = None
    if request.response_format is not None and request.response_format.type != "text":
        spec_field = "response_format"
        if request.response_format.type == "json_schema":
            spec = request.response_format.json_schema
            if spec is None or spec.json_schema is None:
                _fail("response_format.json_schema", "json_schema.schema is required for type json_schema")
            check_json_schema(spec.json_schema, "response_format.json_schema.schema")
        elif request.response_format.json_schema is not None:
            _fail("response_format.json_schema", "only allowed with type json_schema")
    if request.guided_json is not None:
        spec_field = spec_field or "guided_json"
        schema: Any = request.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError):
                _fail("guided_json", "is not valid JSON")
        check_json_schema(schema, "guided_json")
    if request.guided_regex is not None:
        spec_field = spec_field or "guided_regex"
        check_regex(request.guided_regex, "guided_regex")
    if request.guided_choice is not None:
        spec_field = spec_field or "guided_choice"
    if request.guided_grammar is not None:
        spec_field = spec_field or "guided_grammar"
        if not request.guided_grammar.strip():
            _fail("guided_grammar", "grammar is empty")
    if spec_field is not None:
        _fail(spec_field, "structured output (guided decoding) is not supported yet by this server")
