"""W4: `compiled-serve serve` over HTTP, Poisson arrivals at several rates.

Each request is a streaming /v1/completions call with a token-id prompt, EOS ignored and
`continuous_usage_stats`, so every chunk says how many tokens have come. Per request:
TTFT (send to first token), E2E (send to last token), TPOT = (E2E - TTFT) / (tokens - 1), and
ITL, the gaps between chunks that brought tokens. Arrival gaps are `expovariate(rate)` draws of
their own `random.Random(ARRIVAL_SEED)`, the same pattern (scaled) at every rate.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from compiled_serve.bench.defaults import ARRIVAL_SEED, TEMPERATURE
from compiled_serve.bench.workloads import Requests
from compiled_serve.errors import CompiledServeError


@dataclass
class RequestTiming:
    ttft_s: float
    e2e_s: float
    tokens: int
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / max(self.tokens - 1, 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = math.ceil(len(ordered) * q / 100)
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def arrival_offsets(num_requests: int, rate: float) -> list[float]:
    rng = random.Random(ARRIVAL_SEED)
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


# Serve flags that are argparse.BooleanOptionalAction: False is spelled --no-<flag>.
_NEGATABLE = frozenset({"enable_prefix_caching"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str, settings: dict[str, Any], timeout_s: float) -> Iterator[tuple[str, float]]:
    """Starts `compiled-serve serve` on loopback; yields (base URL, seconds to /health 200)."""
    port = _free_port()
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) and name in _NEGATABLE:
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, bool):
            flags += [flag] if value else []  # store_true flags
        elif value is not None:
            flags.append(f"{flag}={value}")
    cmd = [sys.executable, "-m", "compiled_serve.cli", "serve", "--model", model, "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *flags]
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            yield base, wait_healthy(base, timeout_s, server, log, start)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_healthy(base: str, timeout_s: float, server: subprocess.Popen | None = None, log: Any = None,
                 start: float | None = None) -> float:
    start = time.perf_counter() if start is None else start
    while time.perf_counter() - start < timeout_s:
        if server is not None and server.poll() is not None:
            log.seek(0)
            raise CompiledServeError(f"the server exited during start-up ({server.returncode}):\n"
                                     f"{log.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise CompiledServeError(f"{base}/health did not answer 200 within {timeout_s:.0f} s")


async def _one_request(client: httpx.AsyncClient, body: dict[str, Any], at: float) -> RequestTiming:
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise CompiledServeError(f"/v1/completions answered {resp.status_code}: {(await resp.aread())[:500]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise CompiledServeError(f"stream error: {event['error']}")
            count = (event.get("usage") or {}).get("completion_tokens", 0)
            if count > tokens:
                stamps.append(time.perf_counter())
                tokens = count
    if tokens != body["max_tokens"]:
        raise CompiledServeError(f"asked for {body['max_tokens']} tokens, the stream brought {tokens}")
    return RequestTiming(ttft_s=stamps[0] - sent, e2e_s=stamps[-1] - sent, tokens=tokens,
                         itl_s=[b - a for a, b in zip(stamps, stamps[1:])])


async def _run_rate(base: str, requests: Requests, rate: float) -> tuple[list[RequestTiming], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        bodies = [{"prompt": prompt, "max_tokens": out, "temperature": TEMPERATURE, "seed": i, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
                  for i, (prompt, out) in enumerate(zip(requests.prompts, requests.output_lens))]
        offsets = arrival_offsets(len(bodies), rate)
        timings = await asyncio.gather(*(_one_request(client, body, start + at)
                                         for body, at in zip(bodies, offsets)))
        return list(timings), time.perf_counter() - start


def _ms_stats(name: str, values: list[float]) -> dict[str, float]:
    return {f"{name}_p50_ms": 1e3 * statistics.median(values), f"{name}_p99_ms": 1e3 * percentile(values, 99)}


def run_serve(base: str, requests: Requests, rates: list[float]) -> list[dict[str, Any]]:
    """One row per rate, lightest first (the first request after ready lands in it)."""
    rows = []
    for rate in sorted(rates):
        timings, wall = asyncio.run(_run_rate(base, requests, rate))
        produced = sum(t.tokens for t in timings)
        rows.append({
            "rate_req_s": rate, "num_requests": len(timings), "wall_s": wall, "out_tok_s": produced / wall,
            # Little's law: the mean number of requests in flight.
            "mean_concurrency": sum(t.e2e_s for t in timings) / wall,
            "first_request_ttft_ms": 1e3 * timings[0].ttft_s,
            **_ms_stats("ttft", [t.ttft_s for t in timings]), **_ms_stats("tpot", [t.tpot_s for t in timings]),
            **_ms_stats("itl", [gap for t in timings for gap in t.itl_s]),
            **_ms_stats("e2e", [t.e2e_s for t in timings]),
        })
    return rows
