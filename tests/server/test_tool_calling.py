"""Tool calling through the official `openai` client against the real server (SmolLM2, whose
template has no tool support, so the default tools-in-the-system-turn prompt is used)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from chat_stream import streamed_chat
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
    content, calls, finish = streamed_chat(client, **kwargs)
    assert content == (whole.message.content or "")
    assert [call[1:] for call in calls] == [(c.function.name, c.function.arguments)
                                            for c in whole.message.tool_calls or []]
    assert finish == whole.finish_reason


# Under tool_choice auto, a regex makes the model write two hermes calls, so the parser (not the
# forced-call grammar) must find both; the city, unit and zone are still the model's choice.
TWO_CALLS = [{"role": "user", "content": "Weather in Paris, and the time in Oslo?"}]
TWO_CALLS_REGEX = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{1,10}", '
                   r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>\n<tool_call>\n\{"name": "get_time", '
                   r'"arguments": \{"zone": "[A-Z]{3}"\}\}\n</tool_call>')


@pytest.mark.parametrize("parallel", [True, False])
def test_two_auto_calls_parse_streamed_and_not(client: openai.OpenAI, parallel: bool) -> None:
    kwargs: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "messages": TWO_CALLS,
                              "tools": [WEATHER_TOOL, TIME_TOOL], "parallel_tool_calls": parallel,
                              "temperature": 1.0, "seed": 5, "max_tokens": 120,
                              "extra_body": {"structured_outputs": {"regex": TWO_CALLS_REGEX}}}
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None, whole
    calls = whole.message.tool_calls
    assert [c.function.name for c in calls] == (["get_weather", "get_time"] if parallel else ["get_weather"])
    _validate_calls(calls, [WEATHER_TOOL, TIME_TOOL])
    assert len({c.id for c in calls}) == len(calls)
    content, streamed, finish = streamed_chat(client, **kwargs)
    assert (content, finish) == ("", "tool_calls")
    assert [call[1:] for call in streamed] == [(c.function.name, c.function.arguments) for c in calls]
    assert len({call[0] for call in streamed}) == len(streamed)


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


def _validate_calls(calls: list[Any], allowed: list[dict[str, Any]]) -> None:
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in allowed}
    assert calls
    for call in calls:
        assert call.id and call.type == "function"
        assert call.function.name in schemas
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_calls_always_validate(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK,
                                              tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
                                              temperature=1.0, n=4, max_tokens=256, seed=7)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None
        _validate_calls(choice.message.tool_calls, [WEATHER_TOOL, TIME_TOOL])


def test_named_function_is_the_one_called(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK,
                                                  tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=named,
                                                  temperature=1.0, max_tokens=256, seed=seed)
        calls = response.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_time"
        _validate_calls(calls, [TIME_TOOL])


def test_streamed_required_call_name_once_then_argument_fragments(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": "SmolLM2-135M-Instruct", "messages": ASK, "tools": [WEATHER_TOOL],
                              "tool_choice": "required", "temperature": 0, "max_tokens": 256}
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict[str, str]] = {}
    fragments, finish = 0, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            assert not choice.delta.content
            for call in choice.delta.tool_calls or []:
                if call.index not in calls:
                    assert call.id and call.function.name
                    calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None and call.function.name is None
                    fragments += 1
                calls[call.index]["arguments"] += call.function.arguments or ""
    assert finish == "tool_calls" and fragments > 1
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_TOOL["function"]["parameters"])


def test_parallel_tool_calls_false_allows_one_call(client: openai.OpenAI) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Weather in Paris and Oslo?"}],
            tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False,
            temperature=1.0, max_tokens=256, seed=seed)
        calls = response.choices[0].message.tool_calls
        assert len(calls) == 1
        _validate_calls(calls, [WEATHER_TOOL, TIME_TOOL])


def test_parallel_calls_get_distinct_ids_and_validate(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Weather in Paris and Oslo?"}],
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=True, temperature=1.0,
        n=4, max_tokens=400, seed=3)
    closed = [choice for choice in response.choices if choice.finish_reason != "length"]
    assert closed  # the grammar allows any number of calls; a long array may not close in time
    for choice in closed:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        _validate_calls(choice.message.tool_calls, [WEATHER_TOOL, TIME_TOOL])
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


def test_forced_call_and_response_format_together_are_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER_TOOL],
                                       tool_choice="required", response_format={"type": "json_object"}, max_tokens=8)
    assert caught.value.body["param"] == "tool_choice"
