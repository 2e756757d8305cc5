"""A periodic engine line while there is work, like vLLM's throughput log:

    engine: prompt 512.3 tok/s, generation 88.1 tok/s, running 4, waiting 0, KV cache 12.5% used,
    prefix-cache hits 40.0%

Computed in the server from the engine's stats snapshots (EngineStats: cumulative token and
prefix-cache counters, instant queue and KV-cache figures), so it needs nothing from the engine
and works the same with the engine in its own process or on a thread. An idle interval (no
tokens, no requests running or waiting) logs nothing, so an idle server stays quiet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("compiled_serve.stats")


class EngineStatsLog:
    def __init__(self, snapshot: Callable[[], Any | None], interval_s: float):
        self._snapshot = snapshot
        self.interval_s = interval_s
        self._last: Any | None = None
        self._last_time = 0.0

    def line(self, now: float) -> str | None:
        """The line for the interval since the previous call, or None when it was idle."""
        stats = self._snapshot()
        if stats is None:
            return None
        last, last_time = self._last, self._last_time
        self._last, self._last_time = stats, now
        if last is None:
            return None  # the first snapshot only starts the first interval
        elapsed = max(now - last_time, 1e-9)
        prompt = stats.prompt_tokens_total - last.prompt_tokens_total
        generated = stats.generation_tokens_total - last.generation_tokens_total
        if not prompt and not generated and not stats.num_running and not stats.num_waiting:
            return None
        queries = stats.prefix_cache_queries - last.prefix_cache_queries
        hits = stats.prefix_cache_hits - last.prefix_cache_hits
        hit_rate = f"{100 * hits / queries:.1f}%" if queries > 0 else "-"
        return (f"engine: prompt {prompt / elapsed:.1f} tok/s, generation {generated / elapsed:.1f} tok/s, "
                f"running {stats.num_running}, waiting {stats.num_waiting}, "
                f"KV cache {100 * stats.kv_cache_usage:.1f}% used, prefix-cache hits {hit_rate}")

    async def run(self) -> None:
        """Logs a line every interval_s until cancelled."""
        self.line(time.monotonic())
        while True:
            await asyncio.sleep(self.interval_s)
            text = self.line(time.monotonic())
            if text is not None:
                logger.info("%s", text)
