"""Plumbing shared by the generation endpoints: SSE responses, fan-in of several request
streams, cumulative outputs turned into per-choice deltas, and non-streaming collection that
aborts when the client goes away."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from compiled_serve.outputs import CompletionOutput, RequestOutput
from compiled_serve.server.access_log import count_outputs
from compiled_serve.server.engine_loop import EngineLoop, RequestStream
from compiled_serve.server.errors import APIError, error_body
from compiled_serve.server.protocol import StreamOptions

_DISCONNECT_POLL_S = 0.25
_DONE = object()


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def finite(value: float) -> float:
    """JSON has no -inf; a token the model rules out entirely reports -9999 (as vLLM does)."""
    return value if math.isfinite(value) else -9999.0


def sse_event(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client disconnecting (whatever the ASGI
    spec version) and always closes its iterator, so the generator's cleanup (abort) runs now
    rather than whenever the garbage collector finalizes it."""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._source = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away mid-write
                    group.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(watch)
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Fans in several request streams as (stream index, output); closing it closes them all.
    The tokens of each stream's latest output go to the request's access-log line."""
    latest: dict[int, RequestOutput] = {}
    try:
        async for index, output in _merge(streams):
            latest[index] = output
            yield index, output
    finally:
        count_outputs(latest.values())


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        try:
            async for output in streams[0].outputs():
                yield 0, output
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream.outputs():
                queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            stream.close()


async def collect_final(streams: list[RequestStream], request: Request) -> list[RequestOutput]:
    """Waits for every stream to finish; aborts them all if the client disconnects first."""

    async def gather() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for index, output in merge_streams(streams):
            finals[index] = output
        return [f for f in finals if f is not None]

    task = asyncio.create_task(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(400, "The client disconnected.", code="client_disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for stream in streams:
            stream.close()


def stream_error_event(exc: BaseException) -> str:
    """An error that happens after the SSE response started goes out as one last event."""
    if isinstance(exc, APIError):
        return sse_event(error_body(exc.status, exc.message, exc.param, exc.code))
    return sse_event(error_body(500, "Internal server error.", code="internal_error"))


async def add_all(engine_loop: EngineLoop, request_id: str, prompts: list[str | list[int]], params: Any,
                  arrival: float) -> list[RequestStream]:
    """Adds one engine request per prompt; if any is refused, the ones already added are aborted."""
    streams: list[RequestStream] = []
    try:
        for index, prompt in enumerate(prompts):
            suffix = f"-{index}" if len(prompts) > 1 else ""
            streams.append(await engine_loop.add_request(request_id + suffix, prompt, params, arrival))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


def usage_of(finals: list[RequestOutput]) -> dict[str, Any]:
    prompt_tokens = sum(len(final.prompt_token_ids) for final in finals)
    completion_tokens = sum(len(out.token_ids) for final in finals for out in final.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(final.num_cached_tokens for final in finals)},
    }


@dataclass
class ChoiceDelta:
    """What one choice (a sample of one prompt's stream) gained since its previous event."""

    stream_index: int  # which of the request's prompts
    completion: CompletionOutput  # the cumulative output it came from
    text: str  # the new text
    text_start: int  # characters of completion.text sent before
    token_start: int  # tokens of completion.token_ids sent before

    @property
    def first(self) -> bool:
        return self.text_start == 0 and self.token_start == 0


class DeltaTracker:
    """Remembers how much of each choice was sent and turns cumulative outputs into deltas.

    Relies on the engine's contract that a completion's text only grows (the detokenizer holds
    back whatever a stop string could still cut), so `text[sent:]` is always the true delta."""

    def __init__(self) -> None:
        self._sent: dict[tuple[int, int], tuple[int, int]] = {}  # (stream, index) -> (chars, tokens)
        self._done: set[tuple[int, int]] = set()

    def deltas(self, stream_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        """The choices of `output` with new text, new tokens, or a finish not yet sent."""
        moved = []
        for completion in output.outputs:
            key = (stream_index, completion.index)
            if key in self._done:
                continue  # its finish_reason was already sent
            text_start, token_start = self._sent.get(key, (0, 0))
            text = completion.text[text_start:]
            if not text and len(completion.token_ids) <= token_start and not completion.finished:
                continue
            self._sent[key] = (len(completion.text), len(completion.token_ids))
            if completion.finished:
                self._done.add(key)
            moved.append(ChoiceDelta(stream_index, completion, text, text_start, token_start))
        return moved


async def stream_choices(streams: list[RequestStream], header: dict[str, Any], options: StreamOptions | None,
                         choice: Callable[[ChoiceDelta], dict[str, Any]],
                         opening: list[dict[str, Any]] | None = None) -> AsyncIterator[str]:
    """The SSE body of a generation endpoint: `header` fields (id, object, created, model) in
    every event; first the `opening` choices, if any; then one event per progress with
    `choice(delta)` plus finish_reason and stop_reason for each choice that moved; the usage
    event when asked for; then [DONE]. An error after the response started is the last event."""
    include_usage = options is not None and options.include_usage
    continuous = include_usage and options is not None and options.continuous_usage_stats
    tracker = DeltaTracker()
    latest: dict[int, RequestOutput] = {}

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body = header | {"choices": choices}
        if include_usage:
            body["usage"] = usage
        return sse_event(body)

    try:
        if opening:
            yield event(opening)
        async for stream_index, output in merge_streams(streams):
            latest[stream_index] = output
            # `choice` may set its own finish_reason (chat: tool_calls).
            choices = [{"finish_reason": delta.completion.finish_reason,
                        "stop_reason": delta.completion.stop_reason} | choice(delta)
                       for delta in tracker.deltas(stream_index, output)]
            if choices:
                yield event(choices, usage_of(list(latest.values())) if continuous else None)
        if include_usage:
            yield event([], usage_of(list(latest.values())))
        yield SSE_DONE
    except Exception as exc:
        yield stream_error_event(exc)
        yield SSE_DONE
