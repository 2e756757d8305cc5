"""`StructuredOutputsParams`: what a request constrains its output to, as plain data.

vLLM's names and shape (`SamplingParams.structured_outputs`): exactly one of
  json         a JSON schema (dict, or its JSON text)
  json_object  True: any JSON object
  regex        a regular expression (Rust `regex` syntax, anchored at both ends)
  choice       a list of strings: the output is exactly one of them
  grammar      a Lark grammar (llguidance's dialect; GBNF with `::=` is converted)
This shape is a stable interface: tool calling passes a tool's parameters schema through
`structured_outputs.json`. It stays plain data (msgpack-serialisable, no compiled state): the
grammar is compiled from it, through a bounded cache, wherever it is needed.
"""

from __future__ import annotations

import json as json_module
from dataclasses import dataclass
from typing import Any

from compiled_serve.errors import InvalidParameterError

SPEC_KINDS = ("json", "json_object", "regex", "choice", "grammar")
FIELD_PREFIX = "structured_outputs"


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in SPEC_KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise InvalidParameterError(FIELD_PREFIX, f"give exactly one of {', '.join(SPEC_KINDS)} (got {what})")
        kind = given[0]
        field = f"{FIELD_PREFIX}.{kind}"
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    self.json = json_module.loads(value)
                except (ValueError, RecursionError):
                    raise InvalidParameterError(field, "is not valid JSON") from None
            if not isinstance(self.json, dict):
                raise InvalidParameterError(field, f"a JSON schema is an object, got {type(self.json).__name__}")
        elif kind == "json_object" and value is not True:
            raise InvalidParameterError(field, "must be true or absent")
        elif kind in ("regex", "grammar") and (not isinstance(value, str) or not value.strip()):
            raise InvalidParameterError(field, "must be a non-empty string")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
                raise InvalidParameterError(field, "must be a non-empty list of non-empty strings")
            self.choice = list(value)

    @property
    def kind(self) -> str:
        return next(kind for kind in SPEC_KINDS if getattr(self, kind) not in (None, False))

    @property
    def field(self) -> str:
        """The name errors about this spec report (the offline API's)."""
        return f"{FIELD_PREFIX}.{self.kind}"

    def cache_key(self) -> str:
        """Canonical text of the spec: equal specs share one compiled grammar."""
        value = getattr(self, self.kind)
        return self.kind + ":" + json_module.dumps(value, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def coerce(value: Any) -> StructuredOutputsParams | None:
        """A spec from itself, None, or its fields as a dict (as msgpack carries it)."""
        if value is None or isinstance(value, StructuredOutputsParams):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(SPEC_KINDS)
            if unknown:
                raise InvalidParameterError(FIELD_PREFIX, f"unknown fields {sorted(unknown)}")
            return StructuredOutputsParams(**value)
        raise InvalidParameterError(FIELD_PREFIX, f"must be StructuredOutputsParams, got {type(value).__name__}")
