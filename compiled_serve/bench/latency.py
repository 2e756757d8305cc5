"""W3: one request alone; decode tokens per second after the first token.

decode tok/s = (output tokens - 1) / (finish - first token), the first token's time taken from
the engine's own request metrics (time.monotonic), so prefill is left out.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from compiled_serve.bench.offline import sampling_params
from compiled_serve.bench.workloads import Requests
from compiled_serve.errors import CompiledServeError
from compiled_serve.llm import LLM


def run_latency(llm: LLM, requests: Requests, repeats: int) -> dict[str, Any]:
    """Each request runs alone, `repeats` times; the figures are the medians over all runs."""
    runs = []
    for _ in range(repeats):
        for index, (prompt, out_len) in enumerate(zip(requests.prompts, requests.output_lens)):
            runs.append(_one(llm, prompt, out_len, seed=index))
    return {"runs": runs, **{key: statistics.median(run[key] for run in runs)
                             for key in ("decode_tok_s", "ttft_s", "e2e_s")}}


def _one(llm: LLM, prompt: list[int], out_len: int, seed: int) -> dict[str, float]:
    if out_len < 2:
        raise CompiledServeError("decode tok/s needs at least 2 output tokens")
    (params,) = sampling_params([out_len], first_seed=seed)
    start = time.monotonic()
    (output,) = llm.generate([prompt], params, use_progress=False)
    finish = time.monotonic()
    produced = len(output.outputs[0].token_ids)
    first = output.metrics.first_token_time if output.metrics else None
    if produced != out_len or first is None:
        raise CompiledServeError(f"asked for {out_len} tokens, got {produced} (first token at {first})")
    return {"decode_tok_s": (produced - 1) / (finish - first), "ttft_s": first - start, "e2e_s": finish - start}
