"""check_json_schema on arbitrary JSON: a valid schema passes, anything else is a 400 naming
the field, and no input makes it raise something else (a 500). The reference for "valid" is
jsonschema's own 2020-12 metaschema validation."""

from __future__ import annotations

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.structured import check_json_schema

KEYS = st.sampled_from(["$schema", "type", "properties", "items", "required", "pattern", "enum", "$ref",
                        "minLength", "anyOf", "not", "format", "x"])
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) | \
    st.sampled_from(["string", "object", "(", "[a-z]+", "http://json-schema.org/draft-07/schema#", ""])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
                    max_leaves=12)
META_2020 = jsonschema.Draft202012Validator(jsonschema.Draft202012Validator.META_SCHEMA,
                                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(schema=JSON)
def test_any_json_is_accepted_or_a_400_naming_the_field(schema) -> None:
    try:
        check_json_schema(schema, "guided_json")
    except InvalidParameterError as exc:
        assert exc.field == "guided_json"
        accepted = False
    else:
        accepted = True
    if not (isinstance(schema, dict) and "$schema" in schema):  # otherwise another draft decides
        assert accepted == META_2020.is_valid(schema), schema


@pytest.mark.parametrize("schema", [{"$schema": 5}, {"$schema": []}, {"$schema": {}}, "a string", 3])
def test_non_schemas_are_refused(schema) -> None:
    with pytest.raises(InvalidParameterError):
        check_json_schema(schema, "guided_json")
