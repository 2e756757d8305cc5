"""Plausible request bodies made from the `openai` package's own request TypedDicts.

`variants(tp, name)` walks a type's annotations (TypedDicts, unions, literals, lists, dicts) and
returns values: the first is a minimal one (a TypedDict's required keys only), each further one
differs from it in one place (another union member or literal, or one more optional key). So
sending each top-level field's variants sends every field the package knows, nested ones too.
A few field names get values that make sense (a token id for logit_bias keys, a JSON schema for
`schema`); everything else gets a value of the declared type.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any

import typing_extensions

TOOL_NAME = "get_weather"
OBJECT_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}

# Values by field name, where "any value of the type" would be refused for a reason of its own.
BY_NAME: dict[str, Any] = {
    "max_tokens": 2, "max_completion_tokens": 2, "n": 1, "best_of": 1, "logprobs_int": 2, "top_logprobs": 2,
    "seed": 7, "logit_bias": {"42": 1}, "parameters": OBJECT_SCHEMA, "schema": OBJECT_SCHEMA,
    "arguments": '{"city": "Paris"}', "name": TOOL_NAME, "url": "https://example.com/cat.png",
    "data": "UklGRg==", "file_data": "JVBERi0=", "content": "Say hi.", "prompt": "Say hi.",
}

_MAX_DEPTH = 8


def _strip(tp: Any) -> Any:
    """Required[X], NotRequired[X], Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(tp)
        if origin in (typing_extensions.Required, typing_extensions.NotRequired, typing.Required,
                      typing.NotRequired):
            tp = typing.get_args(tp)[0]
        elif origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        else:
            return tp


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and typing_extensions.is_typeddict(tp)


def _scalar(tp: Any, name: str) -> list[Any]:
    if name in BY_NAME and not isinstance(BY_NAME[name], (dict, list)):
        value = BY_NAME[name]
        if isinstance(value, bool) is (tp is bool) and isinstance(value, tp):
            return [value]
    if tp is bool:
        return [True]
    if tp is int:
        return [BY_NAME["logprobs_int"] if name == "logprobs" else 1]
    if tp is float:
        return [0.5]
    if tp is str:
        return ["x"]
    if tp is object:
        return ["x"]
    raise TypeError(f"no plausible value for {tp!r} ({name})")


def _typeddict(tp: Any, depth: int) -> list[Any]:
    hints = typing.get_type_hints(tp, include_extras=True)
    # The package's TypedDicts are total=False with Required[...] marks, under postponed
    # annotations, so __required_keys__ cannot see them: read the marks from the hints.
    required = [k for k in hints if typing.get_origin(hints[k]) in (typing_extensions.Required, typing.Required)]
    optional = [k for k in hints if k not in required]
    per_key = {k: variants(hints[k], k, depth + 1) for k in hints}
    base = {k: per_key[k][0] for k in required}
    out = [base]
    for k in required:
        out += [base | {k: v} for v in per_key[k][1:]]
    for k in optional:
        out += [base | {k: v} for v in per_key[k]]
    return out


def variants(tp: Any, name: str = "", depth: int = 0) -> list[Any]:
    """Values for a field of type `tp` named `name`: a minimal one first, then one per variation."""
    if depth > _MAX_DEPTH:
        raise RecursionError(f"{name}: nested deeper than {_MAX_DEPTH}")
    if name in BY_NAME and isinstance(BY_NAME[name], (dict, list)):
        return [BY_NAME[name]]
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for member in args:
            if member is type(None):
                out.append(None)
            else:
                out += variants(member, name, depth)
        # The minimal value first: a non-null one (a null is a variation).
        return sorted(out, key=lambda v: v is None)
    if origin in (typing.Literal, typing_extensions.Literal):
        return list(args)
    if _is_typeddict(tp):
        return _typeddict(tp, depth)
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence) or \
            getattr(tp, "__name__", "") == "SequenceNotStr":
        return [[v] for v in variants(args[0], name, depth + 1)]
    if origin is dict:
        return [{"k": v} for v in variants(args[1], name, depth + 1)[:1]]
    if tp is dict:
        return [{"k": "v"}]
    return _scalar(tp, name)


def request_fields(params: Any) -> dict[str, Any]:
    """The request TypedDict's fields and their annotations (streaming variants' `stream` too)."""
    hints = dict(typing.get_type_hints(params.CompletionCreateParamsBase, include_extras=True))
    hints["stream"] = bool
    return hints
