"""Objects that list their properties are closed before compiling (structured/closed_objects.py):
the transform itself, and a compiled grammar that refuses an invented key, token by token."""

from __future__ import annotations

import pytest

from compiled_serve.structured.closed_objects import close_objects
from compiled_serve.structured.spec import StructuredOutputsParams

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
           "required": ["city", "celsius"]}  # fmt: skip


def test_listed_property_objects_are_closed_everywhere_in_the_schema() -> None:
    nested = {
        "type": "object",
        "properties": {"place": WEATHER, "tags": {"type": "array", "items": WEATHER},
                       "either": {"anyOf": [WEATHER, {"type": "null"}]}, "ref": {"$ref": "#/$defs/w"}},
        "$defs": {"w": WEATHER},
    }  # fmt: skip
    out = close_objects(nested)
    assert out["additionalProperties"] is False
    assert out["properties"]["place"]["additionalProperties"] is False
    assert out["properties"]["tags"]["items"]["additionalProperties"] is False
    assert out["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert out["properties"]["either"]["anyOf"][1] == {"type": "null"}
    assert out["$defs"]["w"]["additionalProperties"] is False
    assert "additionalProperties" not in nested and "additionalProperties" not in WEATHER  # a copy


@pytest.mark.parametrize("opener", [{"additionalProperties": True}, {"additionalProperties": {"type": "integer"}},
                                    {"patternProperties": {"^x": {}}}, {"unevaluatedProperties": True}])  # fmt: skip
def test_a_schema_that_says_what_other_keys_may_do_is_left_as_it_is(opener: dict) -> None:
    schema = {**WEATHER, **opener}
    assert close_objects(schema) == schema


def test_objects_without_listed_properties_stay_open() -> None:
    # {"type": "object"} is json_object's schema: any object; a property named "properties" is a name.
    assert close_objects({"type": "object"}) == {"type": "object"}
    schema = {"type": "object", "properties": {"properties": {"type": "object"}}}
    assert close_objects(schema)["properties"] == {"properties": {"type": "object"}}


def _feeds(backend, tokenizer, schema: dict, text: str) -> bool:
    """True when the compiled grammar takes every token of `text` and may end after it."""
    matcher = backend.compile(StructuredOutputsParams(json=schema)).matcher()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.accept_token(token):
            return False
    return matcher.accept_token(tokenizer.eos_token_id) and matcher.is_terminated()


def test_the_compiled_grammar_refuses_an_invented_key(smollm2_tokenizer) -> None:
    from compiled_serve.structured.llguidance_backend import LLGuidanceBackend

    backend = LLGuidanceBackend(smollm2_tokenizer, len(smollm2_tokenizer))
    assert _feeds(backend, smollm2_tokenizer, WEATHER, '{"city":"Paris","celsius":21}')
    assert not _feeds(backend, smollm2_tokenizer, WEATHER, '{"city":"Paris","celsius":21,"minimum":3}')
    # Said open: the same text passes.
    assert _feeds(backend, smollm2_tokenizer, {**WEATHER, "additionalProperties": True}, '{"city":"Paris","celsius":21,"minimum":3}')
