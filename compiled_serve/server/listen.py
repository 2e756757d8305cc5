"""Binding the server's socket before the model loads, and a uvicorn server that says when it listens
and ends in-flight streams on shutdown.

    sock = bind_socket(host, port)            # a busy port fails here, in milliseconds
    ... load the model (a minute) ...
    HTTPServer(config, on_listening=...).run(sockets=[sock])

uvicorn's own shutdown waits for every connection to close before the app's lifespan ends, so a
stream in progress ran on until the graceful timeout and was then cancelled (a CancelledError
traceback, a dropped connection). Here shutdown starts the engine loop's drain at once: requests
get `shutdown_timeout_s` to finish, the rest end with an error event and `[DONE]`, and their
connections close on their own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from compiled_serve.errors import CompiledServeError


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for host:port; a busy port is a CompiledServeError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CompiledServeError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may rebind while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise CompiledServeError(f"cannot listen on {host}:{port}: {exc.strerror}; stop whatever uses the port "
                                 "or pick another with --port") from None
    sock.set_inheritable(True)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class HTTPServer(uvicorn.Server):
    """uvicorn.Server that calls `on_listening` once its sockets accept connections, and drains
    the engine loop (`engine_loop.shutdown(grace_s)`) as soon as shutdown begins."""

    def __init__(self, config: uvicorn.Config, *, engine_loop: Any = None, grace_s: float = 0.0,
                 on_listening: Callable[[], None] | None = None):
        super().__init__(config)
        self.engine_loop = engine_loop
        self.grace_s = grace_s
        self.on_listening = on_listening

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit and self.on_listening is not None:
            self.on_listening()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = None
        if self.engine_loop is not None:
            drain = asyncio.ensure_future(self.engine_loop.shutdown(self.grace_s))
        await super().shutdown(sockets=sockets)
        if drain is not None:
            await drain
