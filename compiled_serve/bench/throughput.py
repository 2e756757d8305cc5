"""W1 and W2: every request at once through the offline `LLM`; output tokens per second."""

from __future__ import annotations

import time
from typing import Any

from compiled_serve.bench.offline import output_tokens, sampling_params
from compiled_serve.bench.workloads import Requests
from compiled_serve.errors import CompiledServeError
from compiled_serve.llm import LLM


def run_throughput(llm: LLM, requests: Requests) -> dict[str, Any]:
    """Times one `generate` of all requests on a ready engine (no warm-up: nothing may compile
    after ready)."""
    params = sampling_params(requests.output_lens)
    start = time.perf_counter()
    outputs = llm.generate(requests.prompts, params, use_progress=False)
    elapsed = time.perf_counter() - start
    produced = output_tokens(outputs)
    if produced != sum(requests.output_lens):
        raise CompiledServeError(f"the engine produced {produced} tokens, the workload asked for "
                                 f"{sum(requests.output_lens)}")
    prompt_tokens = sum(requests.prompt_lens)
    return {"elapsed_s": elapsed, "output_tokens": produced, "prompt_tokens": prompt_tokens,
            "out_tok_s": produced / elapsed, "total_tok_s": (produced + prompt_tokens) / elapsed}
