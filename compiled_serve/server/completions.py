"""POST /v1/completions (OpenAI legacy completions), streaming and not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from compiled_serve.errors import InvalidParameterError
from compiled_serve.outputs import CompletionOutput
from compiled_serve.server.engine_loop import RequestStream
from compiled_serve.server.params import COMPLETIONS_DEFAULT_MAX_TOKENS, build_sampling_params
from compiled_serve.server.protocol import CompletionRequest
from compiled_serve.server.request_fields import refuse_unsupported_completion
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

router = APIRouter()


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    assert prompt is not None  # refuse_unsupported_completion ran first
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], list):
        return [list(ids) for ids in prompt]  # type: ignore[arg-type]
    if prompt and isinstance(prompt[0], str):
        return list(prompt)  # type: ignore[arg-type]
    return [list(prompt)]  # type: ignore[arg-type]


def completion_logprobs(output: CompletionOutput, start: int, offset: int) -> dict[str, Any] | None:
    """OpenAI's legacy shape for tokens [start:]: tokens, token_logprobs, top_logprobs, text_offset."""
    if output.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entries in zip(output.token_ids[start:], output.logprobs[start:]):
        sampled = entries.get(token_id)
        text = (sampled.decoded_token if sampled is not None else None) or ""
        tokens.append(text)
        token_logprobs.append(finite(sampled.logprob) if sampled is not None else None)
        top_logprobs.append({(lp.decoded_token or ""): finite(lp.logprob) for lp in entries.values()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _prompt_text(state: ServerState, prompt: str | list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    return state.tokenizer.decode(prompt) if state.tokenizer is not None else ""


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    arrival = time.monotonic()
    state = get_state(request)
    engine_loop = state.require_engine()
    model = state.check_model(body.model)
    refuse_unsupported_completion(body)
    if body.suffix:
        raise InvalidParameterError("suffix", "suffix is not supported")
    if body.echo and body.logprobs is not None:
        raise InvalidParameterError("echo", "echo together with logprobs (prompt logprobs) is not supported yet")
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    params = build_sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs)
    await compile_structured_outputs(state, params, body)  # a bad spec is a 400 here, not in the engine
    prompts = _prompts(body)
    request_id = new_id("cmpl")
    streams = await add_all(engine_loop, request_id, prompts, params, arrival)
    echoes = [_prompt_text(state, p) if body.echo else "" for p in prompts]
    if body.stream:
        return SSEResponse(_stream(body, model, request_id, streams, echoes))
    finals = await collect_final(streams, request)
    choices = []
    for prompt_index, final in enumerate(finals):
        for output in final.outputs:
            offset = len(echoes[prompt_index])
            choices.append({
                "index": prompt_index * body.n + output.index,
                "text": echoes[prompt_index] + output.text,
                "logprobs": completion_logprobs(output, 0, offset),
                "finish_reason": output.finish_reason,
                "stop_reason": output.stop_reason,
            })
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_of(finals),
    })


def _stream(body: CompletionRequest, model: str, request_id: str, streams: list[RequestStream],
            echoes: list[str]) -> AsyncIterator[str]:
    def choice(delta: ChoiceDelta) -> dict[str, Any]:
        echo = echoes[delta.stream_index]
        return {"index": delta.stream_index * body.n + delta.completion.index,
                "text": (echo if delta.first else "") + delta.text,
                "logprobs": completion_logprobs(delta.completion, delta.token_start, len(echo) + delta.text_start)}

    header = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
    return stream_choices(streams, header, body.stream_options, choice)
