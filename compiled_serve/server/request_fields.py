"""What the server does with OpenAI request fields it does not simply act on.

- Ignored: accepted, not acted on, and logged once per field name per process (as vLLM does),
  so an operator learns what clients send without a line per request.
- Refused: a field asking for something a text model cannot do (audio output, image, audio or
  file input, built-in web search, moderation, deprecated function calling, custom tools) is a
  400 whose `param` names the field and whose message says what is missing.
- Resolved: tool_choice `allowed_tools` narrows `tools` and becomes a plain tool_choice.
"""

from __future__ import annotations

import logging
from typing import Any

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.protocol import (
    AllowedToolsChoice,
    AudioContentPart,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    CustomMessageToolCall,
    CustomTool,
    CustomToolChoice,
    FileContentPart,
    ImageContentPart,
)

logger = logging.getLogger("compiled_serve.server")

# Field -> why it does nothing here (the log line says it).
IGNORED: dict[str, str] = {
    "user": "end-user ids are not tracked",
    "safety_identifier": "end-user ids are not tracked",
    "metadata": "nothing is stored to attach it to",
    "store": "completions are not stored",
    "service_tier": "there is one service tier",
    "prediction": "predicted outputs do not speed up decoding here",
    "prompt_cache_key": "prefix caching is automatic",
    "prompt_cache_options": "prefix caching is automatic",
    "prompt_cache_retention": "prefix caching is automatic (LRU)",
    "reasoning_effort": "the model's reasoning length is not configurable",
    "verbosity": "the model's verbosity is not configurable",
    "stream_options.include_obfuscation": "stream events are not padded",
    "messages[].audio": "this server produces no audio to refer back to",
    "messages[].content[].prompt_cache_breakpoint": "prefix caching is automatic",
}

_logged: set[str] = set()

_NO_INPUT = {ImageContentPart: ("images", "image_url"), AudioContentPart: ("audio", "input_audio"),
             FileContentPart: ("files", "file")}
_DEPRECATED_FUNCTIONS = ("OpenAI's deprecated function calling is not supported; use tools and tool_choice "
                         "(served with tool calls)")


def log_ignored(fields: list[str]) -> None:
    for name in fields:
        if name not in _logged:
            _logged.add(name)
            logger.info("request field %r is accepted and ignored: %s (logged once)", name, IGNORED[name])


def _present(body: Any, name: str) -> bool:
    return name in body.model_fields_set


def ignored_fields(body: ChatCompletionRequest | CompletionRequest) -> list[str]:
    """The ignored fields this request sets (nested ones by their dotted/[] names)."""
    found = [name for name in IGNORED if "." not in name and "[" not in name and name in type(body).model_fields
             and _present(body, name)]
    if body.stream_options is not None and _present(body.stream_options, "include_obfuscation"):
        found.append("stream_options.include_obfuscation")
    if isinstance(body, ChatCompletionRequest):
        if any(m.audio is not None for m in body.messages):
            found.append("messages[].audio")
        if any(part.prompt_cache_breakpoint is not None for m in body.messages if isinstance(m.content, list)
               for part in m.content):
            found.append("messages[].content[].prompt_cache_breakpoint")
    return found


def refuse_unsupported_completion(body: CompletionRequest) -> None:
    if body.prompt is None:
        raise InvalidParameterError("prompt", "a prompt is required: a string, a list of strings, a list of token "
                                    "ids, or a list of those")
    log_ignored(ignored_fields(body))


def refuse_unsupported_chat(body: ChatCompletionRequest, model: str) -> ChatCompletionRequest:
    """Raises InvalidParameterError for a field this text model cannot serve; returns the request
    with `allowed_tools` resolved. `model` is the served name the messages quote."""
    if body.audio is not None:
        raise InvalidParameterError("audio", f"this model ({model}) produces no audio; it writes text only")
    if body.modalities is not None and "audio" in body.modalities:
        raise InvalidParameterError("modalities", f"this model ({model}) produces no audio; use modalities "
                                    "[\"text\"] or leave it out")
    if body.functions is not None:
        raise InvalidParameterError("functions", _DEPRECATED_FUNCTIONS)
    if body.function_call is not None:
        raise InvalidParameterError("function_call", _DEPRECATED_FUNCTIONS)
    if body.web_search_options is not None:
        raise InvalidParameterError("web_search_options", "built-in web search is not available on this server; "
                                    "give the model a function tool that searches instead")
    if body.moderation is not None:
        raise InvalidParameterError("moderation", "moderation is not available on this server")
    for i, tool in enumerate(body.tools or []):
        if isinstance(tool, CustomTool):
            raise InvalidParameterError(f"tools[{i}]", "custom (free-form input) tools are not supported; use "
                                        "function tools")
    if isinstance(body.tool_choice, CustomToolChoice):
        raise InvalidParameterError("tool_choice", "custom (free-form input) tools are not supported; use "
                                    "function tools")
    for i, message in enumerate(body.messages):
        refuse_unsupported_message(message, f"messages[{i}]", model)
    log_ignored(ignored_fields(body))
    return _resolve_allowed_tools(body)


def refuse_unsupported_message(message: ChatMessage, where: str, model: str) -> None:
    if message.role == "function":
        raise InvalidParameterError(f"{where}.role", _DEPRECATED_FUNCTIONS)
    if message.function_call is not None:
        raise InvalidParameterError(f"{where}.function_call", _DEPRECATED_FUNCTIONS)
    for j, call in enumerate(message.tool_calls or []):
        if isinstance(call, CustomMessageToolCall):
            raise InvalidParameterError(f"{where}.tool_calls[{j}]", "custom (free-form input) tools are not "
                                        "supported; use function tools")
    if isinstance(message.content, list):
        for j, part in enumerate(message.content):
            refused = _NO_INPUT.get(type(part))
            if refused is not None:
                what, kind = refused
                raise InvalidParameterError(f"{where}.content[{j}]", f"this model ({model}) takes no {what}: it "
                                            f"reads text only (content part type {kind!r})")


def _resolve_allowed_tools(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """`{"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}`: the tools it names, with
    tool_choice `mode`, exactly as if the client had sent only those tools."""
    choice = body.tool_choice
    if not isinstance(choice, AllowedToolsChoice):
        return body
    tools = [t for t in body.tools or [] if not isinstance(t, CustomTool)]
    known = {t.function.name for t in tools}
    names = [t.function.name for t in choice.allowed_tools.tools]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidParameterError("tool_choice", f"allowed_tools names {unknown[0]!r}, which is not in tools")
    if not names:
        raise InvalidParameterError("tool_choice", "allowed_tools names no tools")
    kept = [t for t in tools if t.function.name in names]
    return body.model_copy(update={"tools": kept, "tool_choice": choice.allowed_tools.mode})
