"""POST /v1/chat/completions, streaming and not; chat-template rendering for chat and /tokenize."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from compiled_serve.errors import CompiledServeError, InvalidParameterError
from compiled_serve.outputs import CompletionOutput, Logprob
from compiled_serve.server.engine_loop import RequestStream
from compiled_serve.server.output_parsing import (
    ChoiceParser,
    OutputDelta,
    OutputParsers,
    ParsedOutput,
    parse_output,
)
from compiled_serve.server.params import build_sampling_params
from compiled_serve.server.protocol import ChatCompletionRequest, ChatMessage
from compiled_serve.server.reasoning import REASONING_PARSERS
from compiled_serve.server.request_fields import refuse_unsupported_chat
from compiled_serve.server.state import ServerState, get_state, new_id
from compiled_serve.server.streaming import (
    ChoiceDelta,
    SSEResponse,
    add_all,
    collect_final,
    finite,
    stream_choices,
    usage_of,
)
from compiled_serve.server.structured import compile_structured_outputs
from compiled_serve.server.tool_choice import ToolPlan, chat_tool_plan, with_tool_plan
from compiled_serve.server.tool_parsers import TOOL_PARSERS
from compiled_serve.server.tool_parsers.streaming import ToolCallDelta
from compiled_serve.tool_prompt import (
    HERMES_FORMAT,
    ToolPromptFormat,
    default_tool_conversation,
    template_supports_tools,
)

router = APIRouter()
_INLINE_RENDER_CHARS = 32_768
_RENDER_ARGUMENTS = frozenset({"chat_template", "bos_token", "eos_token"})


def conversation_of(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain message dicts; an assistant turn that only calls tools keeps content None."""
    conversation = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": None if m.content is None and m.tool_calls else m.text()}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": c.function.model_dump()}
                                     for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        conversation.append(message)
    return conversation


def _with_tools(conversation: list[dict[str, Any]], template: str, tools: list[dict[str, Any]] | None,
                tool_format: ToolPromptFormat, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """A template that knows tools gets them as `tools` (and call arguments as objects, as
    transformers passes them); any other gets tool_prompt's documented default."""
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in conversation)
    if not uses_tools:
        return conversation
    if not template_supports_tools(template):
        return default_tool_conversation(conversation, tools, tool_format)
    if tools:
        kwargs["tools"] = tools
    for message in conversation:
        for call in message.get("tool_calls") or []:
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except ValueError:
                pass  # shown to the template as the string the client sent
    return conversation


def render_chat_prompt(state: ServerState, messages: list[ChatMessage], *, add_generation_prompt: bool,
                       request_template: str | None = None, continue_final_message: bool = False,
                       template_kwargs: dict[str, Any] | None = None, tools: list[dict[str, Any]] | None = None,
                       tool_format: ToolPromptFormat = HERMES_FORMAT) -> list[int]:
    """Renders the conversation with the (sandboxed) chat template and tokenizes it exactly as the
    offline `LLM.chat` does: no extra special tokens, the template places BOS itself."""
    from compiled_serve.chat_template import render_chat

    template = state.chat_template
    if request_template is not None:
        if not state.config.allow_request_chat_template:
            raise InvalidParameterError("chat_template", "request-supplied chat templates are disabled "
                                        "(the server operator can enable --allow-request-chat-template)")
        template = request_template
    if template is None:
        raise InvalidParameterError("messages", "this model has no chat template; use /v1/completions")
    tokenizer = state.tokenizer
    kwargs = dict(template_kwargs or {})
    # Names render_chat takes itself: passed again they would be a TypeError, blamed on the template.
    clash = sorted((_RENDER_ARGUMENTS | {"tools"} if tools else _RENDER_ARGUMENTS) & kwargs.keys())
    if clash:
        raise InvalidParameterError("chat_template_kwargs", f"{clash[0]!r} cannot be set by a caller")
    conversation = _with_tools(conversation_of(messages), template, tools, tool_format, kwargs)
    try:
        text = render_chat(conversation, template, add_generation_prompt=add_generation_prompt,
                           bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "", **kwargs)
    except InvalidParameterError:
        raise
    except (CompiledServeError, TypeError, ValueError) as exc:
        raise InvalidParameterError("chat_template", f"the chat template failed to render ({type(exc).__name__})"
                                    ) from exc
    except Exception as exc:  # template runtime errors (undefined, sandbox violations, raise_exception)
        raise InvalidParameterError("chat_template", "the chat template failed to render") from exc
    if continue_final_message:
        # As transformers does: cut the rendering right after the final message's content, so
        # the model continues it instead of starting a new turn.
        final = (conversation[-1]["content"] or "").strip()
        if not final or final not in text:
            raise InvalidParameterError("messages", "continue_final_message needs a non-empty final message "
                                        "that the template renders verbatim")
        text = text[: text.rindex(final) + len(final)]
    if not text:
        raise InvalidParameterError("messages", "the rendered conversation is empty")
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _token_entry(lp: Logprob) -> dict[str, Any]:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": finite(lp.logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(output: CompletionOutput, start: int, top: int) -> dict[str, Any] | None:
    if output.logprobs is None:
        return None
    content = []
    for token_id, entries in zip(output.token_ids[start:], output.logprobs[start:]):
        sampled = entries.get(token_id) or Logprob(float("-inf"), 0, None)
        ranked = sorted((lp for lp in entries.values() if 1 <= lp.rank <= top), key=lambda lp: lp.rank)
        content.append(_token_entry(sampled) | {"top_logprobs": [_token_entry(lp) for lp in ranked]})
    return {"content": content}


def output_parsers(state: ServerState, plan: ToolPlan) -> OutputParsers:
    name = state.config.reasoning_parser
    return OutputParsers(REASONING_PARSERS[name] if name else None, plan.parser, None if plan.parallel else 1)


def _tool_calls(parsed: ParsedOutput) -> list[dict[str, Any]]:
    return [{"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call_id, call in zip(parsed.call_ids, parsed.calls)]


def chat_message(parsed: ParsedOutput) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content if parsed.content or not parsed.calls
                               else None}
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning
    if parsed.calls:
        message["tool_calls"] = _tool_calls(parsed)
    return message


def finish_reason(output: CompletionOutput, called: bool) -> str | None:
    return "tool_calls" if called and output.finish_reason == "stop" else output.finish_reason


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    arrival = time.monotonic()
    state = get_state(request)
    engine_loop = state.require_engine()
    model = state.check_model(body.model)
    body = refuse_unsupported_chat(body, model)
    top = body.top_logprobs or 0
    if top > state.max_logprobs:
        raise InvalidParameterError("top_logprobs", f"must be <= {state.max_logprobs} (the server's max_logprobs)")
    tool_parser = TOOL_PARSERS[state.config.tool_call_parser]()
    plan = chat_tool_plan(body, tool_parser)
    params = with_tool_plan(build_sampling_params(body, max_tokens=body.requested_max_tokens(),
                                                  logprobs=top if body.logprobs else None), plan)
    await compile_structured_outputs(state, params, body)  # a bad spec is a 400 here, not in the engine
    render = functools.partial(render_chat_prompt, state, body.messages,
                               add_generation_prompt=body.add_generation_prompt,
                               request_template=body.chat_template,
                               continue_final_message=body.continue_final_message,
                               template_kwargs=body.chat_template_kwargs, tools=plan.prompt_tools,
                               tool_format=tool_parser.prompt_format)
    # Big conversations render and tokenize in a worker thread, so the event loop keeps streaming.
    large = sum(len(m.text()) for m in body.messages) > _INLINE_RENDER_CHARS
    prompt_ids = await asyncio.to_thread(render) if large else render()
    request_id = new_id("chatcmpl")
    streams = await add_all(engine_loop, request_id, [prompt_ids], params, arrival)
    parsers = output_parsers(state, plan)
    if body.stream:
        return SSEResponse(_stream(body, model, request_id, streams, top, parsers))
    finals = await collect_final(streams, request)
    choices = []
    for output in finals[0].outputs:
        parsed = parse_output(parsers, output.text)
        choices.append({
            "index": output.index,
            "message": chat_message(parsed),
            "logprobs": chat_logprobs(output, 0, top),
            "finish_reason": finish_reason(output, bool(parsed.calls)),
            "stop_reason": output.stop_reason,
        })
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_of(finals),
    })


def _delta_message(delta: OutputDelta) -> dict[str, Any]:
    message: dict[str, Any] = {}
    if delta.reasoning:
        message["reasoning_content"] = delta.reasoning
    if delta.content:
        message["content"] = delta.content
    if delta.tool_calls:
        message["tool_calls"] = [_call_delta(call) for call in delta.tool_calls]
    return message


def _call_delta(call: ToolCallDelta) -> dict[str, Any]:
    """The name once, with the id; then argument fragments."""
    function = {"arguments": call.arguments}
    if call.id is None:
        return {"index": call.index, "function": function}
    return {"index": call.index, "id": call.id, "type": "function", "function": {"name": call.name} | function}


def _stream(body: ChatCompletionRequest, model: str, request_id: str, streams: list[RequestStream],
            top: int, parsers: OutputParsers) -> AsyncIterator[str]:
    choice_parsers: dict[tuple[int, int], ChoiceParser] = {}

    def choice(delta: ChoiceDelta) -> dict[str, Any]:
        completion = delta.completion
        parser = choice_parsers.setdefault((delta.stream_index, completion.index), ChoiceParser(parsers))
        parsed = parser.finish(completion.text) if completion.finished else parser.update(completion.text)
        event = {"index": completion.index, "delta": _delta_message(parsed),
                 "logprobs": chat_logprobs(completion, delta.token_start, top)}
        if completion.finished:
            event["finish_reason"] = finish_reason(completion, parser.called)
        return event

    header = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    # The role arrives first, for every choice, as OpenAI does.
    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(body.n)]
    return stream_choices(streams, header, body.stream_options, choice, opening)
