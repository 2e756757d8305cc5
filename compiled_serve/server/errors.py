"""HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Bodies never carry stack traces, file paths or exception reprs: unexpected failures are
logged server-side and answered with a generic 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from compiled_serve.errors import CapacityError, InvalidParameterError

logger = logging.getLogger("compiled_serve.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised by route code to answer with a specific status and OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class EngineDeadError(APIError):
    def __init__(self) -> None:
        super().__init__(503, "The engine has stopped; the server cannot take requests.", code="engine_dead")


class ServerBusyError(APIError):
    def __init__(self, retry_after_s: int, message: str = "The server is busy; retry later.") -> None:
        super().__init__(503, message, code="server_busy", headers={"Retry-After": str(retry_after_s)})


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_api_error(exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        return "The request body must be a JSON object.", None
    if kind == "missing" and not loc:
        return "The request body must be a JSON object.", None
    if kind == "extra_forbidden":
        # Every OpenAI request field is declared (protocol.py); this one is neither OpenAI's nor ours.
        return (f"{param}: unknown field (not an OpenAI request field nor one of this server's extensions; "
                "check its spelling)"), param
    # pydantic's message only (never the offending input, which may be huge or sensitive).
    message = str(first.get("msg", "invalid value"))[:512]
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return from_api_error(exc)

    @app.exception_handler(InvalidParameterError)
    async def _invalid_parameter(_: Request, exc: InvalidParameterError) -> JSONResponse:
        message = exc.message if exc.message.startswith(exc.field) else f"{exc.field}: {exc.message}"
        return error_response(400, message, param=exc.field)

    @app.exception_handler(CapacityError)
    async def _capacity(_: Request, exc: CapacityError) -> JSONResponse:
        return error_response(503, "The server is busy; retry later.", code="server_busy",
                              headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error.", code="internal_error")
