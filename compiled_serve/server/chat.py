"""POST /v1/chat/completions, streaming and not; chat-template rendering for chat and /tokenize."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from compiled_serve.errors import CompiledServeError, InvalidParameterError
from compiled_serve.outputs import CompletionOutput, Logprob
from compiled_serve.server.engine_loop import RequestStream
from compiled_serve.server.params import build_sampling_params
from compiled_serve.server.protocol import ChatCompletionRequest, ChatMessage
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

router = APIRouter()
_INLINE_RENDER_CHARS = 32_768
_RENDER_ARGUMENTS = frozenset({"chat_template", "bos_token", "eos_token"})


def render_chat_prompt(state: ServerState, messages: list[ChatMessage], *, add_generation_prompt: bool,
                       request_template: str | None = None, continue_final_message: bool = False,
                       template_kwargs: dict[str, Any] | None = None) -> list[int]:
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
    conversation = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in messages]
    kwargs = dict(template_kwargs or {})
    # Names render_chat takes itself: passed again they would be a TypeError, blamed on the template.
    clash = sorted(_RENDER_ARGUMENTS & kwargs.keys())
    if clash:
        raise InvalidParameterError("chat_template_kwargs", f"{clash[0]!r} cannot be set by a caller")
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
        final = conversation[-1]["content"].strip()
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


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    arrival = time.monotonic()
    state = get_state(request)
    engine_loop = state.require_engine()
    model = state.check_model(body.model)
    top = body.top_logprobs or 0
    if top > state.max_logprobs:
        raise InvalidParameterError("top_logprobs", f"must be <= {state.max_logprobs} (the server's max_logprobs)")
    params = build_sampling_params(body, max_tokens=body.requested_max_tokens(),
                                   logprobs=top if body.logprobs else None)
    render = functools.partial(render_chat_prompt, state, body.messages,
                               add_generation_prompt=body.add_generation_prompt,
                               request_template=body.chat_template,
                               continue_final_message=body.continue_final_message,
                               template_kwargs=body.chat_template_kwargs)
    # Big conversations render and tokenize in a worker thread, so the event loop keeps streaming.
    large = sum(len(m.text()) for m in body.messages) > _INLINE_RENDER_CHARS
    prompt_ids = await asyncio.to_thread(render) if large else render()
    request_id = new_id("chatcmpl")
    streams = await add_all(engine_loop, request_id, [prompt_ids], params, arrival)
    if body.stream:
        return SSEResponse(_stream(body, model, request_id, streams, top))
    finals = await collect_final(streams, request)
    choices = [{
        "index": output.index,
        "message": {"role": "assistant", "content": output.text},
        "logprobs": chat_logprobs(output, 0, top),
        "finish_reason": output.finish_reason,
        "stop_reason": output.stop_reason,
    } for output in finals[0].outputs]
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": choices, "usage": usage_of(finals),
    })


def _stream(body: ChatCompletionRequest, model: str, request_id: str, streams: list[RequestStream],
            top: int) -> AsyncIterator[str]:
    def choice(delta: ChoiceDelta) -> dict[str, Any]:
        return {"index": delta.completion.index, "delta": {"content": delta.text} if delta.text else {},
                "logprobs": chat_logprobs(delta.completion, delta.token_start, top)}

    header = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    # The role arrives first, for every choice, as OpenAI does.
    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(body.n)]
    return stream_choices(streams, header, body.stream_options, choice, opening)
