"""Responses API input -> the chat conversation and tools that the chat path renders.

- `input` as a string is one user message; as a list, each item is a message (`role` plus
  text content, a string or `input_text`/`output_text` parts), a `function_call` (an assistant
  turn's call; consecutive calls share one turn), a `function_call_output` (a tool message), or
  a `reasoning` item (dropped: the model's earlier thinking is not rendered again).
- `instructions` becomes the first system message; as in OpenAI's API it is not carried over
  through `previous_response_id`.
- Function tools are `{"type": "function", "name", "parameters", ...}`; every built-in tool
  (web_search, file_search, computer_use, code_interpreter, mcp, ...) is a 400 that names it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.protocol import ChatMessage
from compiled_serve.server.responses_protocol import ResponsesRequest
from compiled_serve.server.tool_choice import FunctionTool, function_tool, unique_tools

_TEXT_PARTS = ("input_text", "output_text", "text")
_ROLES = ("user", "system", "developer", "assistant")


# Input parts a text model cannot read, and what to call them in the refusal.
_NO_INPUT = {"input_image": "images", "input_audio": "audio", "input_file": "files"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _NO_INPUT:
                raise InvalidParameterError("input", f"{where}.content[{i}]: this model takes no "
                                            f"{_NO_INPUT[kind]}: it reads text only (content part type {kind!r})")
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise InvalidParameterError("input", f"{where}.content[{i}]: only text parts "
                                            f"({', '.join(_TEXT_PARTS)}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidParameterError("input", f"{where}.content must be a string or a list of text parts")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidParameterError("input", f"{where}.{key} must be a string")
    return value


def _item_message(item: Any, where: str, out: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise InvalidParameterError("input", f"{where} must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidParameterError("input", f"{where}.role must be one of {', '.join(_ROLES)}")
        out.append({"role": role, "content": _text(item.get("content"), where)})
    elif kind == "function_call":
        call = {"id": _string(item, "call_id", where), "type": "function",
                "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
        previous = out[-1] if out else None
        if previous is not None and previous["role"] == "assistant" and previous.get("tool_calls") is not None:
            previous["tool_calls"].append(call)
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                    "content": output if isinstance(output, str) else _text(output, where)})
    elif kind != "reasoning":
        raise InvalidParameterError("input", f"{where}: input items of type {str(kind)[:64]!r} are not supported")


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """This request's own input as chat message dicts (no instructions)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(body.input):
        _item_message(item, f"input[{i}]", out)
    return out


def chat_messages(instructions: str | None, conversation: list[dict[str, Any]]) -> list[ChatMessage]:
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    try:
        return [ChatMessage.model_validate(m) for m in messages]
    except ValidationError as exc:
        raise InvalidParameterError("input", f"an input item is malformed: {exc.errors()[0]['msg']}") from None


def function_tools(body: ResponsesRequest) -> list[FunctionTool]:
    tools = []
    for i, tool in enumerate(body.tools or []):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidParameterError(f"tools[{i}]", f"the built-in tool {str(kind)[:64]!r} is not supported by "
                                        "this server; only function tools are")
        name, description = tool.get("name"), tool.get("description")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise InvalidParameterError(f"tools[{i}].name", "must be a non-empty string of at most 64 characters")
        if description is not None and not isinstance(description, str):
            raise InvalidParameterError(f"tools[{i}].description", "must be a string")
        tools.append(function_tool(name, description, tool.get("parameters"), f"tools[{i}].parameters"))
    return unique_tools(tools)


def tool_choice_name(body: ResponsesRequest) -> str | None:
    """none, auto, required, or the name of the function it forces."""
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return choice["name"]
    raise InvalidParameterError("tool_choice", "must be none, auto, required or {'type': 'function', 'name': ...}")
