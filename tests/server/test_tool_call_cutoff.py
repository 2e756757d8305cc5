"""A tool call cut off by max_tokens, through the official `openai` client, for the hermes and
llama3_json parsers: streamed and non-streamed answers are the same (content, tool calls,
finish_reason), and both are the call as far as the model wrote it.

A regex (structured_outputs) makes the model write the parser's call syntax under tool_choice
auto, so the parser, not a grammar-forced path, reads it; the raw text of each cut answer is
read back from its logprobs' tokens and the expectation is derived from it independently.
"""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest
from chat_stream import streamed_chat
from live_server import generation_server

MODEL = "SmolLM2-135M-Instruct"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                          "unit": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
CALL_TEXT = {
    "hermes": f'<tool_call>\n{{"name": "get_weather", "arguments": {ARGUMENTS}}}\n</tool_call>',
    "llama3_json": f'{{"name": "get_weather", "parameters": {ARGUMENTS}}}',
}


def _literal_regex(text: str) -> str:
    """A regex matching exactly `text` (only the metacharacters escaped: the grammar library's
    regex syntax refuses escapes of ordinary characters)."""
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


@pytest.fixture(scope="module", params=sorted(CALL_TEXT))
def served(request: pytest.FixtureRequest, engine) -> Any:
    for live in generation_server(engine, tool_call_parser=request.param):
        yield request.param, openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0,
                                           timeout=120)


def _request(parser: str, max_tokens: int) -> dict[str, Any]:
    return dict(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], max_tokens=max_tokens, temperature=0, seed=0,
                logprobs=True, extra_body={"structured_outputs": {"regex": _literal_regex(CALL_TEXT[parser])}})


def _non_streamed(client: openai.OpenAI, parser: str, max_tokens: int) -> tuple[dict[str, Any], str, int]:
    """(the answer, the raw text its tokens spell, how many tokens)."""
    choice = client.chat.completions.create(**_request(parser, max_tokens)).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    raw = "".join(token.token for token in choice.logprobs.content)
    answer = {"content": choice.message.content or "", "calls": calls, "finish": choice.finish_reason}
    return answer, raw, len(choice.logprobs.content)


def _streamed(client: openai.OpenAI, parser: str, max_tokens: int) -> dict[str, Any]:
    content, calls, finish = streamed_chat(client, **_request(parser, max_tokens))
    return {"content": content, "calls": [call[1:] for call in calls], "finish": finish}


def _expected(parser: str, raw: str, finished: bool) -> dict[str, Any]:
    """A call whose arguments have started is a call, its arguments as far as written; before
    that, the text is content."""
    start = CALL_TEXT[parser].index(ARGUMENTS)
    if len(raw) <= start:
        return {"content": raw, "calls": [], "finish": "length"}
    return {"content": "", "calls": [("get_weather", raw[start: start + len(ARGUMENTS)])],
            "finish": "tool_calls" if finished else "length"}


@pytest.mark.heavy  # 8 constrained requests per parser on the real model
def test_a_cut_off_call_is_the_same_streamed_and_not(served) -> None:
    parser, client = served
    whole, raw, length = _non_streamed(client, parser, 64)
    assert raw.startswith(CALL_TEXT[parser]), raw  # the regex made the model write the call
    assert whole == _expected(parser, CALL_TEXT[parser], finished=True)
    assert _streamed(client, parser, 64) == whole
    # Cuts before the arguments, inside them, and just before the end.
    called = []
    for max_tokens in sorted({length // 4, 2 * length // 3, length - 2}):
        cut, raw, _ = _non_streamed(client, parser, max_tokens)
        assert CALL_TEXT[parser].startswith(raw) and len(raw) < len(CALL_TEXT[parser]), raw
        assert cut == _expected(parser, raw, finished=False), f"non-streamed, cut after {raw!r}"
        assert _streamed(client, parser, max_tokens) == cut, f"streamed, cut after {raw!r}"
        called.append(bool(cut["calls"]))
    assert called[0] is False and called[-1] is True  # both sides of the arguments' start were cut


def _ended(client: openai.OpenAI, parser: str, stream: bool, **ending: Any) -> dict[str, Any]:
    request = _request(parser, 64) | ending
    if stream:
        return _streamed_with(client, request)
    choice = client.chat.completions.create(**request).choices[0]
    return {"content": choice.message.content or "",
            "calls": [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []],
            "finish": choice.finish_reason}


def _streamed_with(client: openai.OpenAI, request: dict[str, Any]) -> dict[str, Any]:
    content, calls, finish = streamed_chat(client, **request)
    return {"content": content, "calls": [call[1:] for call in calls], "finish": finish}


@pytest.mark.heavy  # 4 constrained requests per parser on the real model
def test_a_call_ended_by_a_stop_string_or_eos_mid_object_is_the_same_streamed_and_not(served) -> None:
    """The model's text ends inside the call's arguments, on a stop string (the engine's stop) or
    on EOS (a regex that ends mid-object, so the grammar's next mask is EOS only). Before, the
    non-streamed answer was all content with finish_reason "stop" while the stream had already
    sent the call; now both are the call as far as it was written."""
    parser, client = served
    start = CALL_TEXT[parser].index(ARGUMENTS)
    cut = CALL_TEXT[parser].index("celsius")  # mid-arguments: `{"city": "Paris", "unit": "`
    want = {"content": "", "calls": [("get_weather", CALL_TEXT[parser][start:cut])], "finish": "tool_calls"}
    on_stop = {"stop": ["celsius"]}
    on_eos = {"extra_body": {"structured_outputs": {"regex": _literal_regex(CALL_TEXT[parser][:cut])}}}
    for ending in (on_stop, on_eos):
        whole = _ended(client, parser, stream=False, **ending)
        assert whole == want, ending
        assert _ended(client, parser, stream=True, **ending) == whole, ending
