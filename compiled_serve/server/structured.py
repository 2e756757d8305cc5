"""Request-time checks for structured-output specs (response_format, guided_*).

Guided decoding is not implemented yet. An invalid spec (a JSON schema that is not one, a
regex that does not compile) is a 400 naming the field; a valid spec is a 400 "not supported
yet" — never silently ignored, and never handed to the engine loop.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import jsonschema

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.protocol import SamplingFields

_MAX_MESSAGE_CHARS = 200


def _fail(field: str, message: str) -> NoReturn:
    raise InvalidParameterError(field, message)


def check_json_schema(schema: Any, field: str) -> None:
    """Checks the schema against its draft's metaschema (2020-12 unless `$schema` names
    another), formats included (a `pattern` must be a regex)."""
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
