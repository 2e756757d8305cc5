"""Small endpoints: /health, /version, /metrics, /v1/models, /tokenize, /detokenize."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from compiled_serve.errors import InvalidParameterError
from compiled_serve.server.chat import render_chat_prompt
from compiled_serve.server.protocol import DetokenizeRequest, TokenizeRequest
from compiled_serve.server.request_fields import refuse_unsupported_message
from compiled_serve.server.responses import router as responses_router
from compiled_serve.server.state import ServerState, get_state, server_version

router = APIRouter()
router.include_router(responses_router)  # /v1/responses (responses.py)


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine loop runs; 503 once it has died (load balancers take it out)."""
    if get_state(request).alive:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "engine dead"}, status_code=503)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": server_version()}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "compiled-serve",
            "root": state.model_name, "max_model_len": state.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    return {"object": "list", "data": [_model_card(state, name) for name in state.served_model_names]}


# `:path`: a served name may be a hub id with a slash (org/name), which clients put in the URL as is.
@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """`client.models.retrieve(id)`; an id this server does not serve is a 404 in OpenAI's shape."""
    state = get_state(request)
    return _model_card(state, state.check_model(model_id))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = get_state(request)
    state.check_model(body.model)
    if body.messages is not None:
        if state.engine_loop is None:
            raise InvalidParameterError("messages", "this model has no chat template")
        for i, message in enumerate(body.messages):
            refuse_unsupported_message(message, f"messages[{i}]", state.model_name)
        tokens = render_chat_prompt(state, body.messages, add_generation_prompt=body.add_generation_prompt)
    else:
        tokens = list(state.tokenizer(body.prompt or "", add_special_tokens=body.add_special_tokens).input_ids)
    return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    state = get_state(request)
    state.check_model(body.model)
    for token in body.tokens:
        if token >= state.vocab_size:
            raise InvalidParameterError("tokens", f"token id {token} is outside the vocabulary [0, {state.vocab_size})")
    return {"prompt": state.tokenizer.decode(body.tokens)}
