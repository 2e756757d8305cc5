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
def live(engine):
    yield from generation_server(engine)


def _body(i: int) -> tuple[str, dict[str, Any]]:
    common = {"max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "stream": True,
              "stream_options": {"include_usage": True}}
    if i % 2:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": f"Count to {i}."}]}
    return "/v1/completions", common | {"prompt": f"Client {i} says: the weather today is", "n": 1 + i % 3}


def _check_stream(path: str, body: dict[str, Any], lines: list[str]) -> None:
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("error" not in e for e in events), events
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == [] and usage["completion_tokens"] > 0
    n = body.get("n", 1)
    finish = {c["index"]: c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]}
    assert sorted(finish) == list(range(n)) and set(finish.values()) <= {"stop", "length"}
    if path == "/v1/completions":
        text = "".join(c["text"] for e in events[:-1] for c in e["choices"])
        assert usage["completion_tokens"] <= n * MAX_TOKENS and isinstance(text, str)
    else:
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"


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
