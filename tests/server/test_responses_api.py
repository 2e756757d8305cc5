"""The Responses API through the official `openai` client against the real server: text output,
streamed events (parsed by the client into its own event types), instructions,
max_output_tokens, function tools and function-call-output input, previous_response_id,
GET /v1/responses/{id}, and clear 400s for what is not supported."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from live_server import generation_server
from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent

from compiled_serve.server.responses_store import ResponseStore

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def live(engine):
    yield from generation_server(engine)


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_text_response_and_get(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output_text
    assert response.usage.output_tokens == 8
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_streamed_events_join_into_the_non_streamed_response(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "input": "Name a color.", "max_output_tokens": 12, "temperature": 0}
    # The default engine's int4 kernels are not invariant to a prefix-cache hit (README): a first
    # request fills the cache, so the two compared below both hit it and run the same steps.
    client.responses.create(**kwargs)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.incomplete"
    for expected in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done"):
        assert expected in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_instructions_are_the_system_turn(client: openai.OpenAI) -> None:
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    told = client.responses.create(model=MODEL, input="Hi", instructions="Answer in French, always.",
                                   max_output_tokens=1)
    assert told.usage.input_tokens != plain.usage.input_tokens
    assert told.instructions == "Answer in French, always."


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    alone = client.responses.create(model=MODEL, input="What is my name?", max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_missing")


def test_function_tools_and_function_call_output_input(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=24,
                                       temperature=0)
    for item in response.output:
        assert item.type in ("message", "function_call")
    turn = [{"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear", "temp": 21}'}]
    answer = client.responses.create(model=MODEL, input=turn, tools=[WEATHER], max_output_tokens=8)
    assert answer.usage.input_tokens > response.usage.input_tokens + 15


@pytest.mark.parametrize("tools, param", [
    ([{"type": "web_search"}], "tools[0]"),
    ([{"type": "file_search", "vector_store_ids": ["x"]}], "tools[0]"),
    ([{"type": "function", "name": "f", "parameters": {"type": "object", "required": 3}}], "tools[0].parameters"),
])
def test_unsupported_or_bad_tools_are_a_400(client: openai.OpenAI, tools: list, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", tools=tools)
    assert caught.value.body["param"] == param
    assert "not supported" in caught.value.body["message"] or param.endswith("parameters")
    assert client.responses.create(model=MODEL, input="x", max_output_tokens=1).output


def test_unknown_input_items_are_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=[{"type": "computer_call_output", "call_id": "c"}])
    assert caught.value.body["param"] == "input"


@pytest.mark.parametrize("part, what", [
    ({"type": "input_image", "image_url": "https://example.com/cat.png"}, "images"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ({"type": "input_file", "file_id": "file-1"}, "files"),
])
def test_non_text_input_parts_say_the_model_reads_text_only(client: openai.OpenAI, part: dict, what: str) -> None:
    content = [{"type": "input_text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": content}], max_output_tokens=1)
    assert caught.value.body["param"] == "input"
    assert f"takes no {what}" in caught.value.body["message"] and "content[1]" in caught.value.body["message"]


def test_get_unknown_response_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")


def _response(i: int, text: str = "") -> dict:
    return {"id": f"resp_{i}", "output": text}


def test_store_is_bounded_in_entries_and_bytes() -> None:
    store = ResponseStore(max_entries=3, max_bytes=1000)
    for i in range(5):
        store.put(_response(i), [])
    assert len(store) == 3 and store.get("resp_0") is None and store.get("resp_4") is not None
    assert not store.put(_response(9, "x" * 2000), [])  # alone over the budget: not kept
    for i in range(10, 13):
        store.put(_response(i, "y" * 400), [])
    assert store.bytes <= 1000 and len(store) == 2
    assert store.get("resp_10") is None and store.get("resp_12") is not None


def test_streamed_completed_event_is_typed_by_the_client(client: openai.OpenAI) -> None:
    # Bounded: unbounded, a sampled answer can run to the context length (minutes on the CPU).
    events = list(client.responses.create(model=MODEL, input="Hi", stream=True, max_output_tokens=8))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent) or completed.type == "response.incomplete"


def test_forced_function_call_streams_as_function_call_arguments(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
              "max_output_tokens": 128, "temperature": 0}
    whole = client.responses.create(**kwargs)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert len(calls) >= 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert "response.output_text.delta" not in types
    assert types.count("response.function_call_arguments.delta") > 1
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                       and e.output_index == 0)
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert streamed == done.arguments == calls[0].arguments
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].type == "function_call"


def test_a_function_call_cut_by_max_output_tokens_is_the_same_streamed_and_not(client: openai.OpenAI) -> None:
    """The cut call stays a function_call item (status incomplete), its arguments a prefix of the
    uncut call's, streamed as argument deltas that join into the non-streamed item."""
    kwargs = {"model": MODEL, "input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": "required",
              "parallel_tool_calls": False, "temperature": 0}  # one call
    full = client.responses.create(max_output_tokens=128, **kwargs)
    assert full.status == "completed" and full.output[0].type == "function_call"
    full_arguments = full.output[0].arguments
    cut = client.responses.create(max_output_tokens=full.usage.output_tokens - 6, **kwargs)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in cut.output] == ["function_call"], cut.output
    call = cut.output[0]
    assert call.name == "get_weather" and call.status == "incomplete"
    assert full_arguments.startswith(call.arguments) and 0 < len(call.arguments) < len(full_arguments)
    events = list(client.responses.create(stream=True, max_output_tokens=full.usage.output_tokens - 6, **kwargs))
    assert "response.output_text.delta" not in [e.type for e in events]
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed == call.arguments
    assert events[-1].type == "response.incomplete"
    final = events[-1].response.output
    assert [(i.type, i.name, i.arguments, i.status) for i in final] == \
        [("function_call", "get_weather", call.arguments, "incomplete")]
