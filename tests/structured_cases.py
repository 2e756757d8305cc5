"""JSON schemas, regexes and a Lark grammar the structured-output tests sample against, each
with the check (jsonschema, re.fullmatch, a hand parser) that decides whether an output obeys it."""

from __future__ import annotations

import json
import re

import jsonschema

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                "minItems": 2, "maxItems": 4}},
        "required": ["tags"], "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}},
        "required": ["color", "size"], "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}},
        "required": ["age", "score"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000},
                                        {"type": "string", "pattern": "^id-[a-z]{3}$"}]}},
        "required": ["id"], "additionalProperties": False,
    },
    "string_pattern": {
        "type": "object",
        "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
                       "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
        "required": ["email", "phone"], "additionalProperties": False,
    },
}

REGEX = r"(yes|no), [0-9]{1,3} (cats|dogs)"
CHOICES = ["positive", "negative", "neutral"]
# Sums of two or three single digits: "1+2", "4+0+9".
LARK = 'start: sum\nsum: DIGIT "+" DIGIT | DIGIT "+" DIGIT "+" DIGIT\nDIGIT: /[0-9]/\n'
LARK_OUTPUT = re.compile(r"[0-9]\+[0-9](\+[0-9])?")


def assert_valid_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
