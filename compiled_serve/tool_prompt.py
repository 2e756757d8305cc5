"""Tools in the prompt for a chat template that knows nothing of tools.

A template that mentions `tools` (Qwen2.5, Llama 3.1, Hermes, Mistral, ...) gets the tool
list as its `tools` variable and the messages as they are. One that does not (the embedded
SmolLM2's) gets this documented default instead, so a model can still be asked to call tools:

- the system turn (the first message if it is a system one, else a new one) gains a section
  that lists each tool as `{"type": "function", "function": {...}}` JSON, one per line, inside
  `<tools></tools>`, and shows the call syntax of the server's tool-call parser;
- an assistant turn's `tool_calls` become text in that syntax, after its content;
- `tool` results become a user turn, each result inside `<tool_response></tool_response>`
  (consecutive results share one turn).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CallList = list[tuple[str, str]]  # (name, arguments JSON text)


@dataclass(frozen=True)
class ToolPromptFormat:
    """How a parser's calls look, for the prompt: a template line and a renderer."""

    syntax: str  # shown to the model, e.g. '<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>'
    render_calls: Callable[[CallList], str]


def _call_json(name: str, arguments: str, key: str = "arguments") -> str:
    try:
        value: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        value = arguments  # a client's own broken arguments are shown as they were sent
    return json.dumps({"name": name, key: value}, ensure_ascii=False)


HERMES_FORMAT = ToolPromptFormat(
    syntax='<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
    render_calls=lambda calls: "\n".join(f"<tool_call>\n{_call_json(n, a)}\n</tool_call>" for n, a in calls),
)
LLAMA3_JSON_FORMAT = ToolPromptFormat(
    syntax='{"name": <function-name>, "parameters": <args-json-object>} (several calls separated by "; ")',
    render_calls=lambda calls: "; ".join(_call_json(n, a, "parameters") for n, a in calls),
)
MISTRAL_FORMAT = ToolPromptFormat(
    syntax='[TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}, ...]',
    render_calls=lambda calls: "[TOOL_CALLS][" + ", ".join(_call_json(n, a) for n, a in calls) + "]",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def template_supports_tools(template: str) -> bool:
    return "tools" in template


def tools_section(tools: list[dict[str, Any]], fmt: ToolPromptFormat) -> str:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
            "</tools>\n\nFor each function call, return a json object with function name and arguments "
            f"in this form:\n{fmt.syntax}")


def _calls_text(message: dict[str, Any], fmt: ToolPromptFormat) -> str:
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    content = message.get("content") or ""
    if not calls:
        return content
    return (content + "\n" if content else "") + fmt.render_calls(calls)


def default_tool_conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                              fmt: ToolPromptFormat = HERMES_FORMAT) -> list[dict[str, Any]]:
    """The conversation rewritten as the module docstring says; plain role/content dicts."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            result = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        elif role == "assistant":
            out.append({"role": "assistant", "content": _calls_text(message, fmt)})
        else:
            out.append({k: v for k, v in message.items() if k in ("role", "content", "name")})
    for message in out:
        message.pop("tool_results", None)
    if tools:
        section = tools_section(tools, fmt)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = out[0] | {"content": (out[0].get("content") or "") + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT + "\n\n" + section})
    return out
