"""The offline engine as the bench runs it: dummy weights, token-id prompts, EOS ignored."""

from __future__ import annotations

import time
from typing import Any

from compiled_serve.bench.defaults import TEMPERATURE
from compiled_serve.llm import LLM
from compiled_serve.sampling_params import SamplingParams


def start_llm(model: str, settings: dict[str, Any]) -> tuple[LLM, float]:
    """The ready engine and the seconds from construction to ready (load, compile, warm-up)."""
    start = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", **settings)
    return llm, time.perf_counter() - start


def sampling_params(output_lens: list[int], first_seed: int = 0) -> list[SamplingParams]:
    """Exactly `out` tokens per request; request i samples with seed first_seed + i."""
    return [SamplingParams(temperature=TEMPERATURE, seed=first_seed + i, ignore_eos=True, max_tokens=out)
            for i, out in enumerate(output_lens)]


def output_tokens(outputs: list[Any]) -> int:
    return sum(len(completion.token_ids) for out in outputs for completion in out.outputs)
