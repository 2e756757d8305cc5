"""What the routes share: config, the engine loop (or the embedding model), tokenizer, metrics."""

from __future__ import annotations

import importlib.metadata
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from compiled_serve.server.config import ServerConfig
from compiled_serve.server.engine_loop import EngineLoopBase
from compiled_serve.server.errors import APIError
from compiled_serve.server.metrics import ServerMetrics


@dataclass
class ServerState:
    config: ServerConfig
    served_model_names: tuple[str, ...]
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    metrics: ServerMetrics
    engine_loop: EngineLoopBase | None = None  # generative models
    embedder: Any = None  # compiled_serve.embedding.EmbeddingEngine for embedding models
    chat_template: str | None = None
    max_logprobs: int = 0
    structured_outputs_backend: str = "auto"  # as the engine's: compile_structured_outputs uses it
    startup_report: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def alive(self) -> bool:
        if self.engine_loop is not None:
            return self.engine_loop.alive
        return self.embedder is not None

    def check_model(self, requested: str | None) -> str:
        """The name to report back; 404 for a model this server does not serve."""
        if requested is None or requested in self.served_model_names:
            return requested or self.model_name
        raise APIError(404, f"The model '{requested[:256]}' does not exist; this server serves "
                       f"{', '.join(self.served_model_names)}.", param="model", code="model_not_found")

    def require_engine(self) -> EngineLoopBase:
        if self.engine_loop is None:
            raise APIError(400, f"The model '{self.model_name}' serves embeddings only.",
                           param="model", code="unsupported_endpoint")
        return self.engine_loop


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def server_version() -> str:
    try:
        return importlib.metadata.version("compiled-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
