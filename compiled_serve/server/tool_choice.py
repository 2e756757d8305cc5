"""A request's tools and tool_choice, checked and turned into what serves them.

- `none`: no tools in the prompt, no parsing.
- `auto` (the default when tools are given): the tools go into the prompt and the configured
  parser reads the output.
- `required` or a named function: a grammar forces a JSON array of `{"name", "arguments"}`
  calls whose arguments validate against the tool's `parameters` (one call unless
  `parallel_tool_calls`); `ForcedCallParser` reads it.

A tool whose `parameters` is not a JSON schema, or that does not describe an object, is a 400
naming the field; so is a tool_choice naming a function that is not in `tools`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from compiled_serve.errors import InvalidParameterError
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.server.protocol import ChatCompletionRequest, NamedToolChoice
from compiled_serve.server.structured import check_json_schema
from compiled_serve.server.tool_parsers import ForcedCallParser, ToolParser
from compiled_serve.structured import StructuredOutputsParams

_DEFINITION_KEYS = ("$defs", "definitions")


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # always an object schema

    def as_chat_tool(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    prompt_tools: list[dict[str, Any]] | None  # what the chat template sees (None: no tools)
    parser: ToolParser | None
    forced_schema: dict[str, Any] | None  # the grammar's JSON schema for required / named
    parallel: bool = True  # False: only the first call counts (the grammar allows one when forced)


def function_tool(name: str, description: str | None, parameters: dict[str, Any] | None,
                  field: str) -> FunctionTool:
    """Checks one tool's `parameters` (None means no arguments)."""
    schema = {"type": "object", "properties": {}} if parameters is None else parameters
    check_json_schema(schema, field)
    if not isinstance(schema, dict):
        raise InvalidParameterError(field, "must be a JSON schema object")
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise InvalidParameterError(field, "must describe an object (the call's arguments)")
    return FunctionTool(name, description, schema | {"type": "object"})


def _call_schema(tool: FunctionTool, definitions: dict[str, Any]) -> dict[str, Any]:
    arguments = copy.deepcopy(tool.parameters)
    arguments.pop("$schema", None)
    for key in _DEFINITION_KEYS:
        for name, definition in (arguments.pop(key, None) or {}).items():
            # Nested into one schema, every tool's "#/$defs/X" points at the root: names must agree.
            if definitions.setdefault(f"{key}/{name}", definition) != definition:
                raise InvalidParameterError("tools", f"two tools define {key}/{name} differently; a forced "
                                            "tool_choice needs the names to be unique")
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_call_schema(tools: list[FunctionTool], parallel: bool) -> dict[str, Any]:
    """The schema of a valid answer: an array of calls to `tools`, at least one (at most one
    unless `parallel`)."""
    definitions: dict[str, Any] = {}
    calls = [_call_schema(tool, definitions) for tool in tools]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    for path, definition in definitions.items():
        key, name = path.split("/", 1)
        schema.setdefault(key, {})[name] = definition
    return schema


def plan_tools(tools: list[FunctionTool] | None, tool_choice: str | None, parallel: bool,
               parser: ToolParser | None) -> ToolPlan:
    """`tool_choice`: none, auto, required, or a function name (None: auto with tools, else none)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidParameterError("tool_choice", "needs tools")
        return ToolPlan(None, None, None)
    prompt_tools = [tool.as_chat_tool() for tool in tools]
    if tool_choice == "none":
        return ToolPlan(None, None, None)
    if tool_choice in (None, "auto"):
        return ToolPlan(prompt_tools, parser, None, parallel)
    if tool_choice == "required":
        return ToolPlan(prompt_tools, ForcedCallParser(), forced_call_schema(tools, parallel), parallel)
    named = [tool for tool in tools if tool.name == tool_choice]
    if not named:
        raise InvalidParameterError("tool_choice", f"names the function {tool_choice!r}, which is not in tools")
    return ToolPlan(prompt_tools, ForcedCallParser(), forced_call_schema(named, parallel=False), False)


def unique_tools(tools: list[FunctionTool]) -> list[FunctionTool]:
    names = [tool.name for tool in tools]
    for name in names:
        if names.count(name) > 1:
            raise InvalidParameterError("tools", f"the function name {name!r} is used twice")
    return tools


def chat_tool_plan(body: ChatCompletionRequest, parser: ToolParser | None) -> ToolPlan:
    tools = unique_tools([function_tool(t.function.name, t.function.description, t.function.parameters,
                                        f"tools[{i}].function.parameters") for i, t in enumerate(body.tools or [])])
    choice = body.tool_choice
    name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    return plan_tools(tools, name, body.parallel_tool_calls is not False, parser)


def with_tool_plan(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
    """The request's sampling params, plus what its tools need: the forced call's grammar, and
    special tokens kept in the text when the parser's marker is one."""
    if plan.forced_schema is not None:
        if params.structured_outputs is not None:
            raise InvalidParameterError("tool_choice", "a forced tool call and a structured-output format cannot "
                                        "both constrain the output")
        params = dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=plan.forced_schema))
    if plan.parser is not None and plan.parser.needs_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params
