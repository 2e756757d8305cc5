"""One access-log line per HTTP request: client, method, path, status, latency and tokens.

    127.0.0.1:50412 "POST /v1/chat/completions" 200 0.412s prompt_tokens=25 completion_tokens=8

The middleware runs outermost, so refusals by the guards (401, 413, 431) are logged too. The
latency runs until the response's last byte, so a stream's line comes when it ends. Tokens are
what the generation endpoints' request streams carried (streaming.merge_streams counts them,
aborted streams included), or the inputs an embedding request encoded; a request that
generated nothing logs no tokens. Logged at INFO by the `compiled_serve.access` logger;
`--disable-access-log` leaves the middleware out.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compiled_serve.outputs import RequestOutput

logger = logging.getLogger("compiled_serve.access")


@dataclass
class TokenCount:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    counted: bool = False


# The request's count, set by the middleware; tasks the request spawns copy the context, so they
# add to the same object.
_current: contextvars.ContextVar[TokenCount | None] = contextvars.ContextVar("access_log_tokens", default=None)


def count_outputs(outputs: Iterable[RequestOutput]) -> None:
    """Adds the tokens of each engine request's latest (cumulative) output to this HTTP request's line."""
    count = _current.get()
    if count is None:
        return
    for output in outputs:
        count.prompt_tokens += len(output.prompt_token_ids)
        count.completion_tokens += sum(len(completion.token_ids) for completion in output.outputs)
        count.counted = True


def count_prompt_tokens(num_tokens: int) -> None:
    """For endpoints without engine outputs (embeddings)."""
    count = _current.get()
    if count is not None:
        count.prompt_tokens += num_tokens
        count.counted = True


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app fails before it starts a response, the server answers 500
        count = TokenCount()
        token = _current.set(count)

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            _current.reset(token)
            tokens = (f" prompt_tokens={count.prompt_tokens} completion_tokens={count.completion_tokens}"
                      if count.counted else "")
            logger.info('%s "%s %s" %d %.3fs%s', _client(scope), scope["method"], scope["path"], status,
                        time.perf_counter() - start, tokens)
