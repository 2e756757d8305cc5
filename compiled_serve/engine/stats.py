"""Counters and gauges the engine exposes (the server turns them into Prometheus metrics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # prompt tokens found there
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    computed_tokens_total: int  # tokens that went through the model (prefix hits excluded)
