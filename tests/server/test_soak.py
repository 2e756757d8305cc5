"""Soak: 64+ concurrent streaming clients (httpx async); a quarter go away mid-request (closed
streams, cancelled non-streaming calls). Afterwards every KV block is free again, every
completed response is well formed, and /health is 200. Bounded in time and count."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from live_server import LiveServer, generation_server

NUM_CLIENTS = 72
MAX_TOKENS = 12
TIME_LIMIT_S = 240.0


@pytest.fixture(scope="module")
def live(core):
    yield from generation_server(core)


def _body(i: int) -> tuple[str, dict[str, Any]]:
    # Logprobs give one entry per streamed token, so the usage can be checked against the deltas.
    common = {"max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "stream": True,
              "stream_options": {"include_usage": True}}
    if i % 2:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": f"Count to {i}."}],
                                                 "logprobs": True}
    return "/v1/completions", common | {"prompt": f"Client {i} says: the weather today is", "n": 1 + i % 3,
                                        "logprobs": 0}


def _check_stream(path: str, body: dict[str, Any], lines: list[str]) -> None:
    """A completed stream: every choice streams text and tokens, finishes once with the reason its
    token count implies, and the final usage counts exactly the tokens that were streamed."""
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("error" not in e for e in events), events
    *progress, last = events
    chat = path == "/v1/chat/completions"
    if chat:  # the role comes first, alone
        assert progress.pop(0)["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]
    n = body.get("n", 1)
    texts, tokens, finish = [""] * n, [0] * n, {}
    for event in progress:
        for choice in event["choices"]:
            index = choice["index"]
            assert index not in finish, "an event after the choice's finish_reason"
            texts[index] += (choice["delta"].get("content") or "") if chat else choice["text"]
            logprobs = choice["logprobs"]
            tokens[index] += len(logprobs["content"] if chat else logprobs["tokens"])
            if choice["finish_reason"] is not None:
                finish[index] = choice["finish_reason"]
    assert sorted(finish) == list(range(n))
    for index in range(n):
        if finish[index] == "length":
            assert tokens[index] == MAX_TOKENS
        else:  # EOS: counted as a token, shown as no text
            assert finish[index] == "stop" and 1 <= tokens[index] <= MAX_TOKENS
        assert texts[index] or tokens[index] == 1, (index, texts, tokens)  # only an immediate EOS is empty
    usage = last["usage"]
    assert last["choices"] == []
    assert usage["completion_tokens"] == sum(tokens), (usage, tokens)
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + sum(tokens)


async def _client(i: int, client: httpx.AsyncClient) -> str:
    path, body = _body(i)
    if i % 8 == 4:  # a non-streaming call the client gives up on
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")} | {"max_tokens": 200}
        try:
            await asyncio.wait_for(client.post(path, json=body), timeout=0.5 + (i % 5) * 0.1)
        except asyncio.TimeoutError:
            return "cancelled"
        return "completed-early"
    hang_up = i % 8 == 0
    lines: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if hang_up and len(lines) >= 2:
                return "disconnected"  # leaving the block closes the connection mid-stream
    _check_stream(path, body, lines)
    return "completed"


async def _soak(base_url: str) -> list[str]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=TIME_LIMIT_S, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(_client(i, client) for i in range(NUM_CLIENTS))),
                                      timeout=TIME_LIMIT_S)


def test_soak_concurrent_streams_with_disconnects(live: LiveServer) -> None:
    stats = live.state.engine_loop.stats
    start_free = stats.num_free_blocks
    assert stats.num_running == 0 and start_free == stats.num_total_blocks
    results = asyncio.run(_soak(live.base_url))
    assert results.count("completed") >= NUM_CLIENTS // 2
    assert results.count("disconnected") + results.count("cancelled") >= NUM_CLIENTS // 8
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = live.state.engine_loop.stats
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == start_free:
            break
        time.sleep(0.1)
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, start_free)
    assert live.state.engine_loop.num_in_flight == 0
    with live.client() as http:
        assert http.get("/health").status_code == 200
        response = http.post("/v1/completions", json={"prompt": "Still there?", "max_tokens": 3,
                                                      "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
