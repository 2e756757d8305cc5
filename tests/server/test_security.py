"""One test per item of SECURITY.md that the HTTP server owns: each asserts the status code
and that a normal request is served right afterwards."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from live_server import LiveServer, generation_server

from compiled_serve.server import ServerConfig

API_KEY = "sec-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_COMPLETION = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
OK_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def live(engine):
    yield from generation_server(engine, api_key=API_KEY, allow_request_chat_template=True)


@pytest.fixture
def http(live: LiveServer):
    with live.client(headers=AUTH) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    # No internals: no stack traces, file paths or exception reprs.
    for leak in ("Traceback", "/work/", "site-packages", ".py\"", "File \""):
        assert leak not in response.text
    return error


def assert_still_serves(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json=OK_COMPLETION)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")


# --- Bad input gets a clear 4xx -------------------------------------------------------------
BAD_BODIES = {
    "string": '"a string"', "list": "[1, 2]", "number": "42", "null": "null", "malformed": "{not json",
    "empty": "", "truncated": '{"prompt": ', "deep-list": "[" * 50_000,
    "deep-field": '{"prompt": ' + "[" * 20_000 + "1" + "]" * 20_000 + "}",
}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_body_not_a_json_object(http: httpx.Client, path: str, raw: str) -> None:
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_error(response, 400)
    assert_still_serves(http)


def test_wrong_content_type(http: httpx.Client) -> None:
    response = http.post("/v1/completions", content=json.dumps(OK_COMPLETION), headers={"Content-Type": "text/plain"})
    assert 400 <= response.status_code < 500
    response = http.post("/v1/completions", data={"prompt": "hi"})  # form-encoded
    assert_error(response, 400)
    assert_still_serves(http)


@pytest.mark.parametrize("prompt, param", [
    ("", "prompt"), ([], "prompt"), ([1, 2, 10**7], "prompt"), ([5, -1], "prompt.list[int].1"),
])
def test_bad_prompts(http: httpx.Client, prompt: Any, param: str) -> None:
    error = assert_error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}), 400)
    assert error["param"] is not None and error["param"].startswith("prompt")
    assert_still_serves(http)


def test_prompt_plus_max_tokens_over_context(http: httpx.Client, live: LiveServer) -> None:
    too_many = live.state.max_model_len
    assert_error(http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": too_many}), 400, "max_tokens")
    long_prompt = [42] * (live.state.max_model_len + 1)
    response = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    assert response.status_code in (400, 413)
    assert_error(http.post("/v1/chat/completions", json=OK_CHAT | {"max_completion_tokens": too_many}), 400)
    assert_still_serves(http)


NAN_BODIES = [
    '{"prompt": "hi", "max_tokens": 2, "temperature": NaN}',
    '{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}',
    '{"prompt": "hi", "max_tokens": 2, "presence_penalty": -Infinity}',
    '{"prompt": "hi", "max_tokens": 2, "frequency_penalty": NaN}',
    '{"prompt": "hi", "max_tokens": 2, "repetition_penalty": Infinity}',
    '{"prompt": "hi", "max_tokens": 2, "min_p": NaN}',
    '{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": NaN}}',
    '{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": Infinity}}',
    '{"prompt": "hi", "max_tokens": 2, "temperature": 1e999}',
]


@pytest.mark.parametrize("raw", NAN_BODIES)
def test_nan_and_inf(http: httpx.Client, raw: str) -> None:
    assert_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert_still_serves(http)


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", 101), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2),
    ("presence_penalty", 5), ("frequency_penalty", -5), ("repetition_penalty", 0), ("max_tokens", 0),
    ("max_tokens", -3), ("n", 0), ("n", 5), ("n", 10**6), ("best_of", 9), ("logprobs", 6), ("logprobs", -1),
    ("min_tokens", -1), ("seed", 2**70), ("stop_token_ids", [10**8]), ("stop_token_ids", [-1]),
    ("temperature", "hot"), ("n", True),
])
def test_out_of_range_numbers(http: httpx.Client, field: str, value: Any) -> None:
    error = assert_error(http.post("/v1/completions", json=OK_COMPLETION | {field: value}), 400)
    assert error["param"] is not None and error["param"].startswith(field)
    assert_still_serves(http)


def test_chat_caps(http: httpx.Client) -> None:
    assert_error(http.post("/v1/chat/completions", json=OK_CHAT | {"logprobs": True, "top_logprobs": 6}), 400,
                 "top_logprobs")
    assert_error(http.post("/v1/chat/completions", json=OK_CHAT | {"top_logprobs": 2}), 400)
    assert_error(http.post("/v1/chat/completions", json=OK_CHAT | {"n": 5}), 400, "n")
    assert_error(http.post("/v1/chat/completions", json={"messages": [], "max_tokens": 2}), 400, "messages")
    assert_still_serves(http)


@pytest.mark.parametrize("bias", [{"99999999": 1.0}, {"abc": 1.0}, {"1.5": 1.0}, {"5": "high"}, {"5": None},
                                  {"-3": 1.0}, {"5": 1000}])
def test_logit_bias(http: httpx.Client, bias: dict) -> None:
    error = assert_error(http.post("/v1/completions", json=OK_COMPLETION | {"logit_bias": bias}), 400)
    assert error["param"].startswith("logit_bias")
    assert_still_serves(http)


@pytest.mark.parametrize("stop", [["s"] * 17, ["x" * 257], [""], [1, 2]])
def test_stop_caps(http: httpx.Client, stop: list) -> None:
    error = assert_error(http.post("/v1/completions", json=OK_COMPLETION | {"stop": stop}), 400)
    assert error["param"].startswith("stop")
    assert_still_serves(http)


def test_payload_too_large(http: httpx.Client, live: LiveServer) -> None:
    cap = live.state.config.max_request_body_bytes
    big = json.dumps({"prompt": "a" * (cap + 10), "max_tokens": 1}).encode()
    assert_error(http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: the cap applies while the body streams in
        for _ in range(cap // 4096 + 4):
            yield b" " * 4096

    with live.client(headers=AUTH) as fresh:
        response = fresh.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(response, 413)
    assert_still_serves(http)


def test_too_many_or_too_large_headers(http: httpx.Client, live: LiveServer) -> None:
    with live.client() as fresh:
        many = {f"x-h-{i}": "v" for i in range(100)} | AUTH
        assert_error(fresh.post("/v1/completions", json=OK_COMPLETION, headers=many), 431)
    with live.client() as fresh:
        assert_error(fresh.post("/v1/completions", json=OK_COMPLETION, headers=AUTH | {"x-big": "v" * 10_000}), 431)
    with live.client() as fresh:  # beyond h11's header-block cap: rejected by the parser itself
        try:
            response = fresh.post("/v1/completions", json=OK_COMPLETION, headers=AUTH | {"x-huge": "v" * 40_000})
            assert response.status_code in (400, 431)
        except httpx.RemoteProtocolError:
            pass  # the connection was closed without a response
    assert_still_serves(http)


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": 3}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": {"type": "object", "required": "a"}}, "guided_json"),
    # Keywords a hand-written shape check easily misses; the 2020-12 metaschema catches them.
    ({"guided_json": {"type": "array", "uniqueItems": "yes"}}, "guided_json"),
    ({"guided_json": {"dependentRequired": {"a": "b"}}}, "guided_json"),
    ({"guided_json": {"$ref": 5, "format": 3}}, "guided_json"),
    ({"guided_json": "3"}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_regex": "a{2,1}"}, "guided_regex"),
])
def test_invalid_structured_output(http: httpx.Client, fields: dict, param: str) -> None:
    for path, body in (("/v1/completions", OK_COMPLETION), ("/v1/chat/completions", OK_CHAT)):
        error = assert_error(http.post(path, json=body | fields), 400, param)
        assert "not supported" not in error["message"]
    assert_still_serves(http)


@pytest.mark.parametrize("fields", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
    {"response_format": {"type": "json_object"}},
    {"guided_regex": "[a-z]+"}, {"guided_choice": ["yes", "no"]},
])
def test_valid_structured_output_is_served(http: httpx.Client, fields: dict) -> None:
    """Served with the constraint (tests/server/test_structured_outputs.py checks the outputs)."""
    response = http.post("/v1/chat/completions", json=OK_CHAT | fields | {"max_tokens": 4})
    assert response.status_code == 200, response.text
    assert_still_serves(http)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% include '/etc/passwd' %}",
    "{{ messages[0]['content'] ",
])
def test_request_chat_template_is_sandboxed(http: httpx.Client, template: str) -> None:
    response = http.post("/v1/chat/completions", json=OK_CHAT | {"chat_template": template})
    assert_error(response, 400, "chat_template")
    assert "root:" not in response.text and "uid=" not in response.text
    assert_still_serves(http)


def test_chat_template_kwargs_cannot_enable_tokenization_or_files(http: httpx.Client) -> None:
    plain = http.post("/v1/chat/completions", json=OK_CHAT).json()["usage"]["prompt_tokens"]
    for kwargs in ({"tokenize": True}, {"return_dict": True}, {"chat_template": "{{ 7 * 7 }}"},
                   {"documents": [{"path": "/etc/passwd"}]}):
        response = http.post("/v1/chat/completions", json=OK_CHAT | {"chat_template_kwargs": kwargs})
        assert "root:" not in response.text
        if response.status_code == 200:  # accepted as a plain variable: the prompt is the usual one
            assert response.json()["usage"]["prompt_tokens"] == plain, kwargs
        else:
            assert_error(response, 400, "chat_template_kwargs")
    assert_still_serves(http)


# --- Things that must never happen ----------------------------------------------------------
def test_every_endpoint_but_health_requires_the_key(live: LiveServer) -> None:
    paths = sorted(live.app.openapi()["paths"]) + ["/openapi.json", "/docs", "/no-such-path"]
    assert "/v1/completions" in paths and "/metrics" in paths
    with live.client() as anon:
        for path in paths:
            for method in ("GET", "POST"):
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                {"Authorization": f"Basic {API_KEY}"}, {"Host": "localhost"},
                                {"Host": "127.0.0.1"}, {"X-Forwarded-For": "127.0.0.1"}):
                    response = anon.request(method, path, headers=headers, json=OK_COMPLETION)
                    if path == "/health" and method == "GET":
                        assert response.status_code == 200
                    else:
                        assert_error(response, 401)
        for trick in ("/health/../v1/models", "//v1/models", "/v1/models?/health", "/health/",
                      "/v1/models#/health", "/%2e%2e/v1/models", "/./v1/models", "/HEALTH"):
            assert anon.get(trick).status_code in (401, 404), trick
            assert anon.get(trick, headers={"Host": "health"}).status_code in (401, 404)
        assert anon.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200


def test_api_key_comparison_is_constant_time() -> None:
    import inspect

    from compiled_serve.server import middleware

    assert "hmac.compare_digest" in inspect.getsource(middleware.ApiKeyAuth)


def test_loopback_by_default() -> None:
    from compiled_serve.cli import build_parser

    assert ServerConfig().host == "127.0.0.1" and ServerConfig().is_loopback
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_disconnect_frees_blocks(live: LiveServer, http: httpx.Client) -> None:
    start = live.state.engine_loop.stats.num_free_blocks
    for _ in range(3):
        with live.client(headers=AUTH) as fresh, fresh.stream(
                "POST", "/v1/completions",
                json={"prompt": "Tell me a long story", "max_tokens": 500, "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # first chunk, then hang up
    _wait_for_free_blocks(live, start)
    assert_still_serves(http)


def _wait_for_free_blocks(live: LiveServer, expected: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = live.state.engine_loop.stats
        if stats.num_free_blocks == expected and stats.num_running == 0 and stats.num_waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"free blocks {live.state.engine_loop.stats.num_free_blocks} != {expected}")


# --- Under load --------------------------------------------------------------------------
def test_full_waiting_queue_answers_503_with_retry_after(live: LiveServer, http: httpx.Client) -> None:
    loop = live.state.engine_loop
    saved = loop.max_waiting_requests
    loop.max_waiting_requests = 0  # every new request finds the queue full
    try:
        for path, body in (("/v1/completions", OK_COMPLETION), ("/v1/chat/completions", OK_CHAT)):
            response = http.post(path, json=body)
            assert_error(response, 503)
            assert int(response.headers["Retry-After"]) >= 1
    finally:
        loop.max_waiting_requests = saved
    assert_still_serves(http)
