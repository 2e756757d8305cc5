"""Shared helpers for tests that run the embedded SmolLM2 weights through the engine."""

from __future__ import annotations

from pathlib import Path

import torch

from compiled_serve.engine.block_manager import BlockManager
from compiled_serve.engine.llm_engine import LLMEngine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
    "Translate to French: good morning",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about autumn leaves falling slowly onto the quiet river at dusk, written by a poet who",
    "Hi",
    "In machine learning, gradient descent is an optimization algorithm used to",
]


def gguf_path() -> Path:
    from compiled_serve.models.default_model import default_model_path

    return Path(default_model_path())


def reconfigure(engine: LLMEngine, *, num_blocks: int | None = None, max_num_batched_tokens: int | None = None,
                enable_prefix_caching: bool = True, max_num_seqs: int | None = None) -> None:
    """Gives an idle engine a fresh block pool (possibly smaller than its cache) and budget."""
    assert not engine.has_unfinished_requests()
    blocks = num_blocks or engine.kv_caches[0].shape[1]
    engine.block_manager = BlockManager(blocks, engine.config.block_size, enable_prefix_caching)
    engine.scheduler.block_manager = engine.block_manager
    engine.scheduler.max_num_batched_tokens = max_num_batched_tokens or engine.config.max_num_batched_tokens
    engine.scheduler.max_num_seqs = max_num_seqs or engine.config.max_num_seqs


class LogitsRecorder:
    """Keeps every sampled row's raw logits, keyed by request id, in step order (either step path)."""

    def __init__(self, engine: LLMEngine):
        self.rows: dict[str, list[torch.Tensor]] = {}
        self._execute = engine.runner.execute

        def record(seqs, logits):
            for j, seq in enumerate(seqs):
                self.rows.setdefault(seq.request_id, []).append(logits[j].clone())

        def execute(sched):
            logits, rows = self._execute(sched)
            record([sched.scheduled[i].seq for i in rows], logits)
            return logits, rows

        engine.runner.execute = execute  # the legacy path
        engine.step_runner.on_logits = record
