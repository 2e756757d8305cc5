"""Pure-ASGI guards that run before any route: header caps, API key, body-size cap.

Order (outermost first): HeaderLimits -> ApiKeyAuth -> BodySizeLimit -> app, so an
unauthenticated client can never make the server buffer a body.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compiled_serve.server.errors import error_response

# The only endpoint reachable without the key: load balancers probe it.
UNAUTHENTICATED_PATHS = frozenset({"/health"})


class HeaderLimits:
    """431 when a request has too many headers, one too large, or too many bytes in total.

    uvicorn's h11 parser also caps the whole header block (h11_max_incomplete_event_size);
    this middleware adds the count and per-header caps, whatever the HTTP implementation.
    """

    def __init__(self, app: ASGIApp, max_count: int, max_header_bytes: int, max_total_bytes: int):
        self.app = app
        self.max_count = max_count
        self.max_header_bytes = max_header_bytes
        self.max_total_bytes = max_total_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", [])
            sizes = [len(name) + len(value) for name, value in headers]
            if len(headers) > self.max_count:
                message = f"Too many request headers (at most {self.max_count})."
            elif sizes and max(sizes) > self.max_header_bytes:
                message = f"A request header is too large (at most {self.max_header_bytes} bytes)."
            elif sum(sizes) > self.max_total_bytes:
                message = f"Request headers are too large (at most {self.max_total_bytes} bytes)."
            else:
                message = ""
            if message:
                response = error_response(431, message, code="headers_too_large", headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def routed_path(scope: Scope) -> str:
    """The path the router matches on. In ASGI, scope["path"] includes the mount prefix
    scope["root_path"]; the router strips that prefix, but only at a segment boundary."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyAuth:
    """Every path but /health needs `Authorization: Bearer <key>`.

    The decision uses only the routed path (the same value the router matches on) and the
    Authorization header: never Host, never a client-controlled prefix. Keys are compared as
    sha256 digests with hmac.compare_digest, so timing reveals neither content nor length.
    """

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key_digest = _digest(api_key.encode())

    def _authorized(self, scope: Scope) -> bool:
        supplied = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = token.strip()
                break
        return hmac.compare_digest(_digest(supplied), self._key_digest) and bool(supplied)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            exempt = routed_path(scope) in UNAUTHENTICATED_PATHS and scope.get("method") in ("GET", "HEAD")
            if not exempt and not self._authorized(scope):
                response = error_response(401, "Invalid or missing API key (use 'Authorization: Bearer <key>').",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        elif scope["type"] == "websocket":
            return  # no websocket endpoints; refuse without a handshake
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for bodies over the cap: by Content-Length up front, and while reading a streamed body.

    The body is read in full (bounded by the cap) before the route runs and then replayed,
    after which `receive` passes through so disconnects still reach the streaming code.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
        code = "payload_too_large" if status == 413 else None
        response = error_response(status, message, code=code, headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"Request body too large (at most {self.max_bytes} bytes)."
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                if not value.isdigit():
                    await self._reject(scope, receive, send, 400, "Invalid Content-Length header.")
                    return
                if int(value) > self.max_bytes:
                    await self._reject(scope, receive, send, 413, too_large)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
