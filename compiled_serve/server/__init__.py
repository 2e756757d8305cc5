"""OpenAI-compatible HTTP server: `compiled-serve serve` or `build_app(ServerConfig(), engine=...)`."""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "build_app", "uvicorn_config"]


def __getattr__(name: str) -> Any:  # lazy: the CLI reads ServerConfig's defaults without importing FastAPI
    if name == "ServerConfig":
        from compiled_serve.server.config import ServerConfig

        return ServerConfig
    if name in ("build_app", "uvicorn_config"):
        from compiled_serve.server import app

        return getattr(app, name)
    raise AttributeError(name)
