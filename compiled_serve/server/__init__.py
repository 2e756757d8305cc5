"""OpenAI-compatible HTTP server: `compiled-serve serve` or `build_app(ServerConfig(), engine=...)`."""

from __future__ import annotations

from compiled_serve.server.app import build_app, uvicorn_config
from compiled_serve.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app", "uvicorn_config"]
