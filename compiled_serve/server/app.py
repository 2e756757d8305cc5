"""Assembles the FastAPI app around an engine (or an embedding model) and runs it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from compiled_serve.server import chat, completions, embeddings, routes
from compiled_serve.server.access_log import AccessLog
from compiled_serve.server.config import ServerConfig
from compiled_serve.server.errors import install_error_handlers
from compiled_serve.server.metrics import ServerMetrics
from compiled_serve.server.middleware import ApiKeyAuth, BodySizeLimit, HeaderLimits
from compiled_serve.server.process_loop import open_engine_loop
from compiled_serve.server.state import ServerState, server_version
from compiled_serve.server.stats_log import EngineStatsLog

logger = logging.getLogger("compiled_serve.server")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_served_name(model: str | None) -> str:
    """A name for /v1/models that does not reveal the server's directory layout."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    if path.exists():
        name = path.resolve().name
        return path.resolve().parent.name if name in ("model", "snapshot", "weights") else name
    return model


def build_app(config: ServerConfig, *, engine: Any = None, embedder: Any = None,
              model: str | None = None) -> FastAPI:
    """`engine`: an EngineCoreClient (its own process, a ProcessEngineLoop talks to it) or an
    LLMEngine (served through an EngineLoop thread); `embedder`: an EmbeddingEngine. Exactly one
    is given. `model` is the name the CLI loaded (for the default served model name)."""
    if (engine is None) == (embedder is None):
        raise ValueError("build_app needs exactly one of engine or embedder")
    names = config.served_model_names or (default_served_name(model),)
    state_ref: dict[str, ServerState] = {}
    def engine_stats() -> Any:
        loop = state_ref["state"].engine_loop if state_ref else None
        return loop.stats if loop is not None else None

    metrics = ServerMetrics(engine_stats, model_name=names[0])
    if engine is not None:
        engine_loop = open_engine_loop(engine, max_waiting_requests=config.max_waiting_requests,
                                       retry_after_s=config.retry_after_s, metrics=metrics)
        served = engine_loop.served_model
        template = served.chat_template
        if config.chat_template_file is not None:
            template = Path(config.chat_template_file).read_text()
        state = ServerState(config=config, served_model_names=names, tokenizer=served.tokenizer,
                            max_model_len=served.max_model_len, vocab_size=served.vocab_size,
                            metrics=metrics, engine_loop=engine_loop, chat_template=template,
                            max_logprobs=served.max_logprobs, startup_report=served.startup_report,
                            structured_outputs_backend=served.structured_outputs_backend)
    else:
        state = ServerState(config=config, served_model_names=names, tokenizer=embedder.tokenizer,
                            max_model_len=embedder.max_seq_length, vocab_size=embedder.vocab_size,
                            metrics=metrics, embedder=embedder)
    state_ref["state"] = state

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.engine_loop is not None:
            state.engine_loop.start()
        stats_task = None
        if state.engine_loop is not None and config.log_stats_interval_s > 0:
            stats_task = asyncio.create_task(EngineStatsLog(engine_stats, config.log_stats_interval_s).run())
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            if state.engine_loop is not None:
                await state.engine_loop.shutdown(config.shutdown_timeout_s)

    app = FastAPI(title="compiled_serve", version=server_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = state
    install_error_handlers(app)
    app.include_router(routes.router)
    if engine is not None:
        app.include_router(completions.router)
        app.include_router(chat.router)
    else:
        app.include_router(embeddings.router)
    # add_middleware wraps: the last one added runs first.
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_body_bytes)
    if config.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(HeaderLimits, max_count=config.max_header_count, max_header_bytes=config.max_header_bytes,
                       max_total_bytes=config.max_total_header_bytes)
    if not config.disable_access_log:
        app.add_middleware(AccessLog)  # outermost: the guards' refusals are logged too
    return app


def uvicorn_config(app: FastAPI, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """h11 (not httptools) so `h11_max_incomplete_event_size` caps the header block."""
    options: dict[str, Any] = dict(
        host=config.host, port=config.port, http="h11", ws="none", lifespan="on",
        h11_max_incomplete_event_size=config.max_total_header_bytes,
        timeout_graceful_shutdown=config.shutdown_timeout_s + 5, server_header=False,
        log_level="info", access_log=False,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
