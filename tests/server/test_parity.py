"""Parity: a greedy chat completion through the server equals `LLM.chat` offline on the same engine."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from live_server import generation_server

CONVERSATIONS = [
    [{"role": "user", "content": "Name three primary colours."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}],
]


@pytest.fixture(scope="module")
def fp32_engine() -> Any:
    """The embedded model with quantization="none", not the shared (default, int4 on the CPU)
    engine: exact parity needs batch-invariant kernels, and the int4 CPU kernel is not. There the
    offline batch of both conversations gave "It's" for the server's "It is", and run one at a
    time, the first conversation (its prompt now a prefix-cache hit) also differed after 14 words."""
    from compiled_serve.config import EngineConfig
    from compiled_serve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=None, compile_mode="graph", num_kv_blocks=64, max_num_seqs=4,
                                  quantization="none"))


def test_greedy_chat_matches_offline(fp32_engine) -> None:
    from compiled_serve import LLM, SamplingParams

    engine = fp32_engine

    served = []
    server = generation_server(engine)
    live = next(server)
    try:
        client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for messages in CONVERSATIONS:
            response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                      max_tokens=24, temperature=0)
            served.append(response.choices[0].message.content)
    finally:
        server.close()  # stops uvicorn and joins the engine thread: the engine is ours again
    # Drive the very same engine offline (LLM's constructor would load a second copy).
    llm = LLM.from_engine(engine)
    offline = llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=24), use_progress=False)
    assert [out.outputs[0].text for out in offline] == served
