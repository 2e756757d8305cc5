"""POST /v1/responses (streamed and not) and GET /v1/responses/{id}: the Responses API on top
of the chat path (template, tools, reasoning and tool-call parsers)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from compiled_serve.errors import InvalidParameterError
from compiled_serve.outputs import RequestOutput
from compiled_serve.sampling_params import SamplingParams
from compiled_serve.server.chat import output_parsers, render_chat_prompt
from compiled_serve.server.engine_loop import RequestStream
from compiled_serve.server.errors import APIError
from compiled_serve.server.output_parsing import ChoiceParser, OutputParsers
from compiled_serve.server.responses_events import ResponseEvents
from compiled_serve.server.responses_input import (
    chat_messages,
    function_tools,
    input_messages,
    tool_choice_name,
)
from compiled_serve.server.responses_protocol import ResponsesRequest
from compiled_serve.server.responses_store import ResponseStore
from compiled_serve.server.state import get_state, new_id
from compiled_serve.server.streaming import SSEResponse, add_all, collect_final, merge_streams
from compiled_serve.server.tool_choice import plan_tools, with_tool_plan
from compiled_serve.server.tool_parsers import TOOL_PARSERS
from compiled_serve.structured import shared_compiler

router = APIRouter()


def response_store(request: Request) -> ResponseStore:
    store = getattr(request.app.state, "responses_store", None)
    if store is None:
        store = request.app.state.responses_store = ResponseStore()
    return store


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.background:
        raise InvalidParameterError("background", "background responses are not supported")
    if body.conversation is not None:
        raise InvalidParameterError("conversation", "conversations are not supported; use previous_response_id")
    text_format = (body.text or {}).get("format") or {"type": "text"}
    if not isinstance(text_format, dict) or text_format.get("type") != "text":
        raise InvalidParameterError("text.format", "only the text format is supported")


def _response_object(body: ResponsesRequest, response_id: str, model: str) -> dict[str, Any]:
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "model": model, "output": [], "instructions": body.instructions, "error": None, "incomplete_details": None,
        "max_output_tokens": body.max_output_tokens, "previous_response_id": body.previous_response_id,
        "parallel_tool_calls": body.parallel_tool_calls is not False, "temperature": body.temperature,
        "top_p": body.top_p, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "text": {"format": {"type": "text"}}, "truncation": body.truncation or "disabled",
        "metadata": body.metadata or {}, "store": body.store, "user": body.user, "usage": None,
    }


def _usage(final: RequestOutput | None) -> dict[str, Any]:
    prompt = len(final.prompt_token_ids) if final else 0
    output = len(final.outputs[0].token_ids) if final else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": final.num_cached_tokens if final else 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


def _as_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages a later turn renders."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    if not text and not calls:
        return []
    return [{"role": "assistant", "content": text or None} | ({"tool_calls": calls} if calls else {})]


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    arrival = time.monotonic()
    state = get_state(request)
    engine_loop = state.require_engine()
    model = state.check_model(body.model)
    _refuse_unsupported(body)
    conversation: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = response_store(request).get(body.previous_response_id)
        if previous is None:
            raise APIError(404, f"No stored response with id '{body.previous_response_id[:256]}'.",
                           param="previous_response_id", code="previous_response_not_found")
        conversation = list(previous.conversation)
    conversation += input_messages(body)
    tool_parser = TOOL_PARSERS[state.config.tool_call_parser]()
    plan = plan_tools(function_tools(body), tool_choice_name(body), body.parallel_tool_calls is not False, tool_parser)
    sampling = {"temperature": body.temperature, "top_p": body.top_p}
    params = with_tool_plan(SamplingParams(max_tokens=body.max_output_tokens,
                                           **{k: v for k, v in sampling.items() if v is not None}), plan)
    if params.structured_outputs is not None:  # the forced call's grammar: a 400 here, never in the engine
        compiler = await asyncio.to_thread(shared_compiler, state.tokenizer, state.vocab_size,
                                           state.structured_outputs_backend)
        await asyncio.to_thread(compiler.compile, params.structured_outputs, "tools")
    prompt_ids = render_chat_prompt(state, chat_messages(body.instructions, conversation), add_generation_prompt=True,
                                    tools=plan.prompt_tools, tool_format=tool_parser.prompt_format)
    response_id = new_id("resp")
    streams = await add_all(engine_loop, response_id, [prompt_ids], dataclasses.replace(params, n=1), arrival)
    events = ResponseEvents(_response_object(body, response_id, model))
    parsers = output_parsers(state, plan)

    def keep() -> None:
        if body.store:
            response_store(request).put(events.response, conversation + _as_messages(events.response["output"]))

    if body.stream:
        return SSEResponse(_stream(events, streams, parsers, keep))
    final = (await collect_final(streams, request))[0]
    completion = final.outputs[0]
    events.add(ChoiceParser(parsers).finish(completion.text))
    events.finish(completion.finish_reason == "length", _usage(final))
    keep()
    return JSONResponse(events.response)


async def _stream(events: ResponseEvents, streams: list[RequestStream], parsers: OutputParsers,
                  keep: Any) -> AsyncIterator[str]:
    parser = ChoiceParser(parsers)
    final: RequestOutput | None = None
    try:
        for event in events.start():
            yield event
        async for _, output in merge_streams(streams):
            final = output
            completion = output.outputs[0]
            delta = parser.finish(completion.text) if completion.finished else parser.update(completion.text)
            for event in events.add(delta):
                yield event
        for event in events.finish(final is not None and final.outputs[0].finish_reason == "length", _usage(final)):
            yield event
        keep()
    except Exception as exc:
        message, code = (exc.message, exc.code or "error") if isinstance(exc, APIError) else \
            ("Internal server error.", "internal_error")
        for event in events.fail(message, code):
            yield event


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> Any:
    get_state(request).require_engine()
    stored = response_store(request).get(response_id)
    if stored is None:
        raise APIError(404, f"No stored response with id '{response_id[:256]}'.", param="response_id",
                       code="response_not_found")
    return JSONResponse(stored.response)
