"""Streamed deltas concatenate to the non-streamed text, stop strings included.

The reference for the stopped text is the free (unstopped) greedy output, cut at the stop that
completes first. Stops are chosen from that free output, so they surely appear: each starts
one character before a multi-byte character and spans tokens, so its first characters arrive
a step before it completes, which is exactly when a stream could leak them.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from live_server import generation_server

MAX_TOKENS = 16
# (endpoint, prompt, n, include_stop_str_in_output): greedy outputs with accented letters and
# with CJK characters split into byte tokens.
CASES = [
    ("/v1/completions", "Le café, le thé, le café, le thé, le café,", 1, False),
    ("/v1/completions", "你好，世界！你好，世界！你好，", 2, True),
    ("/v1/chat/completions", "Say 'café crème' three times.", 3, False),
]


@pytest.fixture(scope="module")
def http(core):
    for live in generation_server(core):
        with live.client() as client:
            yield client


def _body(path: str, prompt: str, **fields: Any) -> dict[str, Any]:
    source = {"messages": [{"role": "user", "content": prompt}]} if "chat" in path else {"prompt": prompt}
    return source | {"max_tokens": MAX_TOKENS, "temperature": 0} | fields


def _text(path: str, choice: dict[str, Any]) -> str:
    return choice["message"]["content"] if "chat" in path else choice["text"]


def _post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return {choice["index"]: choice for choice in response.json()["choices"]}


def _stream(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[dict[int, str], dict[int, Any], dict]:
    """(text per choice index, finish_reason per index, final usage) from the SSE events."""
    texts: dict[int, str] = {}
    finish: dict[int, Any] = {}
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    for event in events[:-1]:
        for choice in event["choices"]:
            index = choice["index"]
            assert index not in finish, "a choice got an event after its finish_reason"
            delta = (choice["delta"].get("content") or "") if "chat" in path else choice["text"]
            texts[index] = texts.get(index, "") + delta
            if choice["finish_reason"] is not None:
                finish[index] = choice["finish_reason"]
    assert events[-1]["choices"] == []
    return texts, finish, events[-1]["usage"]


def _stops_from(free: str) -> list[str]:
    """Two overlapping stops around the first non-ASCII character past the start, and one that
    never appears. The short one completes first; the long one starts before it."""
    at = next(i for i, ch in enumerate(free) if i >= 3 and not ch.isascii())
    return [free[at - 1 : at + 2], free[at - 3 : at + 5], "never appears"]


def _first_stop_cut(text: str, stops: list[str], include: bool) -> str:
    """Reference: the stop whose last character comes first wins (the earliest start on ties)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    end, start, stop = min(found)
    return text[:end] if include else text[:start]


@pytest.mark.parametrize("path,prompt,n,include", CASES)
def test_greedy_stream_with_stops_equals_stopped_text(http, path, prompt, n, include) -> None:
    free = _text(path, _post(http, path, _body(path, prompt))[0])
    stops = _stops_from(free)
    expected = _first_stop_cut(free, stops, include)
    fields = {"stop": stops, "n": n, "include_stop_str_in_output": include}
    whole = _post(http, path, _body(path, prompt, **fields))
    texts, finish, usage = _stream(http, path, _body(path, prompt, **fields))
    assert sorted(whole) == sorted(texts) == list(range(n))
    for index in range(n):
        assert _text(path, whole[index]) == expected
        assert whole[index]["finish_reason"] == "stop" and whole[index]["stop_reason"] == stops[0]
        assert texts[index] == expected, (texts[index], expected, stops)
        assert finish[index] == "stop"
    assert usage["completion_tokens"] >= n


@pytest.mark.parametrize("path,prompt", [case[:2] for case in CASES[1:]])
def test_sampled_n_stream_equals_non_streamed(http, path, prompt) -> None:
    # Seeded sampling: each choice differs, yet streaming must not change any of them.
    sampled = {"n": 3, "temperature": 0.9, "seed": 7}
    first = _text(path, _post(http, path, _body(path, prompt, **sampled))[0])
    middle = len(first) // 2
    fields = sampled | {"stop": [first[middle : middle + 3], first[-4:]]}
    whole = _post(http, path, _body(path, prompt, **fields))
    texts, finish, usage = _stream(http, path, _body(path, prompt, **fields))
    assert whole[0]["finish_reason"] == "stop"  # the premise: choice 0 meets its stops
    for index in range(3):
        assert texts[index] == _text(path, whole[index])
        assert finish[index] == whole[index]["finish_reason"]
