"""Structured outputs through the server with the official `openai` client, the engine in its own
process (as `serve` runs it, so the spec crosses msgpack): chat `response_format` json_schema
(strict) and json_object, and the completions extras (guided_regex, guided_choice,
guided_grammar, structured_outputs), every output checked independently (jsonschema,
re.fullmatch), 50 samples per schema, regex, choice and grammar in the heavy tests; then the
hostile specs, each a 400 naming the field within a bounded time, with a
normal request served right after."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from live_server import generation_server
from structured_cases import CHOICES, LARK, LARK_OUTPUT, REGEX, SCHEMAS, assert_valid_json

API_KEY = "structured-key"
CHAT = [{"role": "user", "content": "Give me the data as JSON."}]
PROMPT = "Answer with the requested data.\n"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(core) -> openai.OpenAI:
    # The serve default body cap (4 MiB), so the 100,000-string enum reaches the grammar checks.
    for live in generation_server(core, api_key=API_KEY, max_request_body_bytes=4 * 2**20):
        yield openai.OpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("name", ["nested_object", "bounded_numbers", "string_pattern"])
def test_chat_json_schema_outputs_validate(client: openai.OpenAI, name: str) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=1.0, n=4, max_tokens=160,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                                 "strict": True}})
    assert len(response.choices) == 4
    for choice in response.choices:
        assert choice.finish_reason == "stop", choice
        assert_valid_json(choice.message.content, SCHEMAS[name])


def test_streamed_chat_json_schema_validates(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=1.0, max_tokens=160, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": SCHEMAS["enum"]}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert_valid_json(text, SCHEMAS["enum"])


def test_chat_json_object(client: openai.OpenAI) -> None:
    # Seeded: unseeded, all four samples once ran past max_tokens in CI (an object may go on for as
    # long as the model likes), and the test could fail on luck. Those that closed must parse.
    # Eight samples (two requests: max_n is 4): on the default int4 CPU kernels a seeded sample also
    # depends on its batch row and on what else runs (they are not batch-invariant), so the seed no
    # longer fixes the outcome, and four once all ran on; about half close within 200 tokens (26 and
    # 25 of 48 seeds, int4 and fp32), so all eight running on is rare.
    closed = [c.message.content for seed in (7, 11)
              for c in client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, n=4,
                                                      max_tokens=200, seed=seed,
                                                      response_format={"type": "json_object"}).choices
              if c.finish_reason == "stop"]
    assert closed
    assert all(isinstance(json.loads(text), dict) for text in closed)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
    ({"guided_choice": CHOICES}, lambda text: text in CHOICES),
    ({"guided_grammar": LARK}, lambda text: LARK_OUTPUT.fullmatch(text)),
    ({"structured_outputs": {"choice": CHOICES}}, lambda text: text in CHOICES),
    ({"structured_outputs": {"json": SCHEMAS["bounded_array"]}},
     lambda text: assert_valid_json(text, SCHEMAS["bounded_array"]) is None),
])
def test_completion_extras_constrain_the_text(client: openai.OpenAI, extra: dict, check) -> None:
    response = client.completions.create(model=MODEL, prompt=PROMPT, temperature=1.0, n=4, max_tokens=120,
                                         extra_body=extra)
    for choice in response.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice


def _fifty(create) -> list:
    """52 choices at temperature 1.0: 13 concurrent requests (the engine batches them) of n=4."""
    with ThreadPoolExecutor(13) as pool:
        responses = list(pool.map(lambda seed: create(seed=seed, n=4, temperature=1.0), range(13)))
    return [choice for response in responses for choice in response.choices]


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fifty_chat_outputs_per_schema_validate(client: openai.OpenAI, name: str) -> None:
    choices = _fifty(lambda **sampling: client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=160, **sampling,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                                 "strict": True}}))
    for choice in choices:
        assert choice.finish_reason == "stop", choice
        assert_valid_json(choice.message.content, SCHEMAS[name])
    assert len({choice.message.content for choice in choices}) > 1  # temperature 1.0 really samples


@pytest.mark.heavy
@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
    ({"guided_choice": CHOICES}, lambda text: text in CHOICES),
    ({"guided_grammar": LARK}, lambda text: LARK_OUTPUT.fullmatch(text)),
], ids=["regex", "choice", "lark"])
def test_fifty_completions_per_regex_choice_and_grammar(client: openai.OpenAI, extra: dict, check) -> None:
    choices = _fifty(lambda **sampling: client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=120, extra_body=extra, **sampling))
    for choice in choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice


def _deep(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


BAD_SPECS = {
    "malformed_schema": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": 3}}}}, "response_format.json_schema.schema"),
    "nested_200": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep(200)}}},
                   "response_format.json_schema.schema"),
    "enum_100k": ({"guided_json": {"enum": [f"v{i}" for i in range(100_000)]}}, "guided_json"),
    "catastrophic_regex": ({"guided_regex": "(a{1000}){1000}"}, "guided_regex"),
    "no_start_rule": ({"guided_grammar": 'item: "a" | "b"'}, "guided_grammar"),
    "two_constraints": ({"guided_regex": "a", "structured_outputs": {"choice": ["a"]}}, "guided_regex"),
    "bad_structured_outputs": ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_bad_specs_are_a_bounded_400_and_the_server_keeps_serving(client: openai.OpenAI, name: str) -> None:
    extra, param = BAD_SPECS[name]
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, extra_body=extra)
    assert time.monotonic() - started < 10
    assert caught.value.body["param"] == param, caught.value.body
    ok = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                        extra_body={"guided_choice": CHOICES})
    assert ok.choices[0].message.content in CHOICES
