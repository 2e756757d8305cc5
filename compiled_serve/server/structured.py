"""Structured-output fields of a request -> `StructuredOutputsParams`, compiled before the request
reaches the engine.

Accepted spellings (vLLM's): `response_format` ({"type": "json_object"} or {"type":
"json_schema", "json_schema": {"schema": ..., "strict": ...}}), `structured_outputs: {json,
regex, choice, grammar, json_object}`, and the older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`. At most one constraint per request. `strict` is accepted
either way: the constraint is always enforced exactly, and a schema keyword the backend cannot
enforce is a 400. The grammar is compiled here, in a worker thread, under the compiler's time
limit and through its bounded cache (compiled_serve/structured/), so an invalid or hostile spec
is a 400 naming the field and never reaches the engine loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.server.protocol import SamplingFields
from compiled_serve.structured import StructuredOutputsParams, shared_compiler
from compiled_serve.structured.checks import check_json_schema

__all__ = ["check_json_schema", "compile_structured_outputs", "structured_spec"]


def _spec(field: str, **kwargs: Any) -> StructuredOutputsParams:
    """The spec, with its own shape errors reported under the request's field name."""
    try:
        return StructuredOutputsParams(**kwargs)
    except InvalidParameterError as exc:
        raise InvalidParameterError(field, exc.message) from None


def _candidates(request: SamplingFields) -> list[tuple[str, StructuredOutputsParams]]:
    found = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.json_schema is None:
            raise InvalidParameterError("response_format.json_schema", "json_schema.schema is required for type json_schema")
        found.append(("response_format.json_schema.schema", _spec("response_format.json_schema.schema",
                                                                  json=spec.json_schema)))
    elif response_format is not None:
        if response_format.json_schema is not None:
            raise InvalidParameterError("response_format.json_schema", "only allowed with type json_schema")
        if response_format.type == "json_object":
            found.append(("response_format", _spec("response_format", json_object=True)))
    if request.structured_outputs is not None:
        fields = request.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        field = "structured_outputs." + next(iter(fields)) if len(fields) == 1 else "structured_outputs"
        found.append((field, _spec(field, **fields)))
    guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
    for name, kind in guided.items():
        value = getattr(request, name)
        if value is not None:
            found.append((name, _spec(name, **{kind: value})))
    return found


def structured_spec(request: SamplingFields) -> tuple[StructuredOutputsParams, str] | None:
    """(spec, the field it came from), or None; InvalidParameterError for a malformed or doubled one."""
    found = _candidates(request)
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidParameterError(found[1][0], f"give one structured-output constraint, got {names}")
    if not found:
        return None
    name, spec = found[0]
    return spec, name


async def compile_structured_outputs(state: Any, params: SamplingParams, request: SamplingFields) -> None:
    """Compiles `params.structured_outputs` (if any) off the event loop; a 400 naming the field
    if it does not compile within the limit. The engine later finds the grammar in the cache
    (in-process) or compiles the same spec again (an engine-core process)."""
    spec = params.structured_outputs
    if spec is None:
        return
    found = structured_spec(request)
    field = found[1] if found is not None and found[0] == spec else "tools"  # a tool plan's schema
    compiler = await asyncio.to_thread(shared_compiler, state.tokenizer, state.vocab_size,
                                       state.structured_outputs_backend)
    await asyncio.to_thread(compiler.compile, spec, field)
