"""Objects that list their properties take no others unless the schema says so.

JSON Schema lets an object carry any key it does not list. A small model sampling under such a
schema wanders into invented keys until max_tokens cuts the JSON (seen with LangChain's
`with_structured_output`: `{"city": ..., "celsius": ..., "minimum": ..., "type": {...` and no
closing brace). xgrammar, vLLM's default backend, closes such objects by default (its strict
mode); this does the same for every backend: an object schema with `properties` and none of
`additionalProperties`, `unevaluatedProperties`, `patternProperties` gets
`additionalProperties: false`. Outputs stay valid under the original schema (the closed one
accepts a subset). A schema that wants open objects says `additionalProperties: true`.
"""

from __future__ import annotations

from typing import Any

# Keywords whose value is one schema, a list of schemas, or a map from names to schemas.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPENERS = ("additionalProperties", "unevaluatedProperties", "patternProperties")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` whose listed-property objects are closed (see the module docstring)."""
    if not isinstance(schema, dict):
        return schema  # true / false / anything malformed: the backend judges it
    out = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPENERS):
        out["additionalProperties"] = False
    return out
