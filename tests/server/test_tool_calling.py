"""Tool calling through the official `openai` client against the real server (SmolLM2, whose
template has no tool support, so the default tools-in-the-system-turn prompt is used)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from live_server import generation_server

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def live(engine):
    yield from generation_server(engine)


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_auto_answers_with_a_valid_message(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER_TOOL],
                                              max_tokens=48, temperature=0)
    choice = response.choices[0]
    if choice.message.tool_calls:  # a 135M model may or may not call; either way the shape holds
        assert choice.finish_reason == "tool_calls"
        json.loads(choice.message.tool_calls[0].function.arguments)
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_streamed_auto_matches_non_streamed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "messages": ASK, "tools": [WEATHER_TOOL],
                              "max_tokens": 48, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert content == (whole.message.content or "")
    assert finish == whole.finish_reason


def test_tool_choice_none_sends_no_tools_to_the_prompt(client: openai.OpenAI, live) -> None:
    plain = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=4, temperature=0)
    none = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER_TOOL],
                                          tool_choice="none", max_tokens=4, temperature=0)
    auto = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER_TOOL],
                                          max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens


def test_multi_turn_with_tool_results(client: openai.OpenAI) -> None:
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                              tools=[WEATHER_TOOL], max_tokens=16, temperature=0)
    short = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER_TOOL],
                                           max_tokens=16, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert response.usage.prompt_tokens > short.usage.prompt_tokens + 20  # the call and the result are in


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}],
     "auto", "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     "auto", "tools[0].function.parameters"),
    ([WEATHER_TOOL], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "required", "tool_choice"),
    ([WEATHER_TOOL, WEATHER_TOOL], "auto", "tools"),
])
def test_bad_tools_are_a_400_and_the_server_keeps_serving(client: openai.OpenAI, tools: Any, choice: Any,
                                                          param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=tools,
                                       tool_choice=choice, max_tokens=4)
    assert caught.value.body["param"] == param
    assert client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=2).choices
