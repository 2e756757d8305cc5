"""POST /v1/embeddings, served when the model is a BERT sentence-embedding model."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.access_log import count_prompt_tokens
from compiled_serve.server.errors import APIError
from compiled_serve.server.protocol import EmbeddingRequest
from compiled_serve.server.state import get_state

router = APIRouter()


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI returns it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Any:
    arrival = time.monotonic()
    state = get_state(request)
    model = state.check_model(body.model)
    embedder = state.embedder
    if embedder is None:
        raise APIError(400, f"The model '{model}' does not produce embeddings.", param="model",
                       code="unsupported_endpoint")
    if body.dimensions is not None and body.dimensions != embedder.dimension:
        raise InvalidParameterError("dimensions", f"this model only produces {embedder.dimension} dimensions")
    raw = body.input
    if isinstance(raw, str):
        texts: list[str] | None = [raw]
        batch = None
    elif raw and isinstance(raw[0], str):
        texts, batch = list(raw), None  # type: ignore[arg-type]
    elif raw and isinstance(raw[0], list):
        texts, batch = None, [list(ids) for ids in raw]  # type: ignore[arg-type]
    else:
        texts, batch = None, [list(raw)]  # type: ignore[arg-type]
    # Tokenization and the forward run in a worker thread: the event loop keeps serving.
    if texts is not None:
        batch = await asyncio.to_thread(embedder.token_ids, texts)
    assert batch is not None
    vectors = await asyncio.to_thread(embedder.embed_ids, batch)
    num_tokens = sum(len(ids) for ids in batch)
    count_prompt_tokens(num_tokens)
    state.metrics.e2e_latency.observe(time.monotonic() - arrival)
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    })
