"""Plumbing shared by the generation endpoints: SSE responses, fan-in of several request
streams, and non-streaming collection that aborts when the client goes away."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from compiled_serve.outputs import RequestOutput
from compiled_serve.server.engine_loop import EngineLoop, RequestStream
from compiled_serve.server.errors import APIError, error_body

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
    """Fans in several request streams as (stream index, output); closing it closes them all."""
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
