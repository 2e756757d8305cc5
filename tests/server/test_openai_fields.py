"""Every field of the `openai` package's chat-completions and completions request types, sent to
the real server (engine in its own process, as `serve` runs it): each is accepted (200, a real
completion) or refused with a 400 whose `param` names the field and whose message says why,
never pydantic's generic "Extra inputs are not permitted". Which ones are refused is written
down here (`expected_refusal`), so a field that starts failing, or starts being silently served
when it should be refused, fails the test. Also: fields we ignore are logged once per name,
null means the default, unknown fields are named as such, and `GET /v1/models/{id}`."""

from __future__ import annotations

import concurrent.futures
import json
import logging
from typing import Any

import httpx
import openai
import pytest
from live_server import generation_server
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params
from openai_request_walk import TOOL_NAME, request_fields, variants

from compiled_serve.server import request_fields as server_fields

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {"name": TOOL_NAME, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
BASE = {"chat": {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1},
        "completions": {"model": MODEL, "prompt": "Say hi.", "max_tokens": 1}}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
GENERIC = ("Extra inputs are not permitted", "unknown field", "Input should be", "Field required")


def _fields() -> list[tuple[str, str, list[Any]]]:
    fields = []
    for kind, params in (("chat", chat_params), ("completions", completion_params)):
        for name, annotation in request_fields(params).items():
            if name != "model":  # the served name; a wrong one is a 404 (test_openai_api)
                fields.append((kind, name, variants(annotation, name)))
    return fields


FIELDS = _fields()


def request_body(kind: str, name: str, value: Any) -> dict[str, Any]:
    """BASE plus the field, and what the field needs to mean something (stream for
    stream_options, logprobs for top_logprobs, tools for tool_choice)."""
    body = dict(BASE[kind]) | {name: value}
    if kind == "chat" and name == "max_tokens" and value is None:
        body["max_completion_tokens"] = 1  # no limit at all generates to the context length
    if name == "stream_options" and value is not None:
        body["stream"] = True
    if name == "top_logprobs" and value is not None:
        body["logprobs"] = True
    if name == "tool_choice" and value is not None:
        body["tools"] = [WEATHER]
        if isinstance(value, dict) and value.get("type") == "allowed_tools":
            # The package types these as free dicts; give one that names a tool.
            body["tool_choice"] = {**value, "allowed_tools": {**value["allowed_tools"], "tools": [
                {"type": "function", "function": {"name": TOOL_NAME}}]}}
    return body


def _parts(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for i, message in enumerate(body.get("messages", [])):
        if isinstance(message.get("content"), list):
            out += [(f"messages[{i}].content[{j}]", part) for j, part in enumerate(message["content"])]
    return out


def expected_refusal(kind: str, body: dict[str, Any]) -> str | None:
    """The `param` of the 400 this body must get, or None when it must be served."""
    if kind == "completions":
        if body.get("prompt") is None:
            return "prompt"
        return "suffix" if body.get("suffix") is not None else None
    for field in ("audio", "functions", "function_call", "web_search_options", "moderation"):
        if body.get(field) is not None:
            return field
    if "audio" in (body.get("modalities") or []):
        return "modalities"
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema" and fmt["json_schema"].get("schema") is None:
        return "response_format.json_schema"  # optional in the type; nothing to enforce without it
    for i, tool in enumerate(body.get("tools") or []):
        if tool["type"] == "custom":
            return f"tools[{i}]"
    if isinstance(body.get("tool_choice"), dict) and body["tool_choice"]["type"] == "custom":
        return "tool_choice"
    for i, message in enumerate(body["messages"]):
        if message["role"] == "function":
            return f"messages[{i}].role"
        if message.get("function_call") is not None:
            return f"messages[{i}].function_call"
        for j, call in enumerate(message.get("tool_calls") or []):
            if call["type"] == "custom":
                return f"messages[{i}].tool_calls[{j}]"
    for where, part in _parts(body):
        if part["type"] in ("image_url", "input_audio", "file"):
            return where
    return None


@pytest.fixture(scope="module")
def live(core):
    yield from generation_server(core)


@pytest.fixture(scope="module")
def http(live) -> Any:
    with live.client() as client:
        yield client


def _served(kind: str, response: httpx.Response, stream: bool) -> None:
    if not stream:
        choices = response.json()["choices"]
        assert choices and all(c["finish_reason"] for c in choices), response.text
        return
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", response.text
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), response.text
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks), response.text


def test_the_walk_covers_every_top_level_field() -> None:
    """The walk itself: every field of both request types is sent, and nested variants are too."""
    sent = {(kind, name) for kind, name, _ in FIELDS}
    for kind, params in (("chat", chat_params), ("completions", completion_params)):
        assert {(kind, name) for name in request_fields(params) if name != "model"} <= sent
    walked = json.dumps([values for _, name, values in FIELDS if name == "messages"])
    for part in ("image_url", "input_audio", "file", "refusal", "tool_calls", "prompt_cache_breakpoint"):
        assert f'"{part}"' in walked


def _problem(http: httpx.Client, kind: str, name: str, value: Any) -> str | None:
    """Why the server's answer to this field's value is wrong, or None."""
    body = request_body(kind, name, value)
    response = http.post(PATHS[kind], json=body)
    refused = expected_refusal(kind, body)
    if refused is None:
        if response.status_code != 200:
            return f"{json.dumps(value)[:200]}: {response.status_code} {response.text[:300]}"
        try:
            _served(kind, response, bool(body.get("stream")))
        except AssertionError as exc:
            return f"{json.dumps(value)[:200]}: {exc}"
        return None
    error = response.json().get("error") if response.status_code == 400 else None
    if error is None:
        return f"{json.dumps(value)[:200]}: expected a 400 naming {refused}, got {response.status_code}"
    if error["param"] != refused or not error["message"].startswith(refused) or \
            any(generic in error["message"] for generic in GENERIC):
        return f"{json.dumps(value)[:200]}: expected a specific 400 naming {refused}, got {error}"
    return None


@pytest.mark.parametrize(("kind", "name", "values"), FIELDS, ids=[f"{k}-{n}" for k, n, _ in FIELDS])
def test_every_openai_request_field_is_served_or_refused_by_name(http: httpx.Client, kind: str, name: str,
                                                                 values: list[Any]) -> None:
    """Each value the walk made for the field, sent concurrently (the engine batches them)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(lambda value: _problem(http, kind, name, value), values) if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("part", "what"), [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "takes no images"),
    ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, "takes no audio"),
    ({"type": "file", "file": {"file_id": "file-1"}}, "takes no files"),
])
def test_non_text_input_says_what_the_model_cannot_read(live, part: dict, what: str) -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0)
    content = [{"type": "text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1)
    assert caught.value.body["param"] == "messages[0].content[1]"
    assert what in caught.value.body["message"] and MODEL in caught.value.body["message"]
    with live.client() as http:  # /tokenize renders the same messages: the same refusal
        response = http.post("/tokenize", json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 400 and what in response.json()["error"]["message"]


def test_audio_output_is_refused_by_name(live) -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                       modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    assert caught.value.body["param"] == "audio" and "produces no audio" in caught.value.body["message"]


def test_ignored_fields_are_logged_once_per_name(http: httpx.Client, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_fields, "_logged", set())  # earlier tests in this process logged them
    body = BASE["chat"] | {"metadata": {"run": "1"}, "store": True, "user": "u-1", "service_tier": "flex"}
    with caplog.at_level(logging.INFO, logger="compiled_serve.server"):
        for _ in range(3):
            assert http.post(PATHS["chat"], json=body).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    for field in ("metadata", "store", "user", "service_tier"):
        assert sum(f"'{field}'" in line for line in lines) == 1, lines
    assert len(lines) == 4, lines


def test_null_means_the_default(http: httpx.Client) -> None:
    """What some clients send for every field they leave unset."""
    body = BASE["chat"] | {"n": None, "stream": None, "logprobs": None, "stop": None, "temperature": None,
                           "stream_options": None, "tools": None, "tool_choice": None, "parallel_tool_calls": None}
    response = http.post(PATHS["chat"], json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_allowed_tools_narrow_the_tools(http: httpx.Client) -> None:
    """tool_choice allowed_tools: the prompt holds only the allowed tool, exactly as if the client
    had sent that tool alone (the same prompt tokens), and not the other one."""
    other = {"type": "function", "function": {"name": "get_time", "description": "The time in a city, as HH:MM.",
                                              "parameters": {"type": "object", "properties": {}}}}
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": TOOL_NAME}}]}}

    def prompt_tokens(body: dict[str, Any]) -> int:
        response = http.post(PATHS["chat"], json=BASE["chat"] | body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    narrowed = prompt_tokens({"tools": [other, WEATHER], "tool_choice": allowed})
    assert narrowed == prompt_tokens({"tools": [WEATHER], "tool_choice": "auto"})
    assert narrowed < prompt_tokens({"tools": [other, WEATHER], "tool_choice": "auto"})
    unknown = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "nope"}}]}}
    response = http.post(PATHS["chat"], json=BASE["chat"] | {"tools": [WEATHER], "tool_choice": unknown})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def test_unknown_field_is_named_as_unknown(http: httpx.Client) -> None:
    response = http.post(PATHS["completions"], json=BASE["completions"] | {"temprature": 0.5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "temprature" and "unknown field" in error["message"]
    assert "Extra inputs" not in error["message"]


def test_models_retrieve(live) -> None:
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="x", max_retries=0)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    assert model.model_extra["max_model_len"] == live.state.max_model_len
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found" and "no-such-model" in caught.value.body["message"]
    with live.client() as http:  # a hub-style id with a slash is one id, not a path
        response = http.get("/v1/models/org/no-such-model")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
