"""The PERF.md workloads W1-W4, vLLM's recorded figures for them, and their requests.

Requests are drawn exactly as PERF.md says, so every engine sees the same ones: one
`random.Random(0)`; for each request, `randint(lo, hi)` prompt tokens and then the prompt itself,
one `randint(0, vocab_size - 1)` per token id; after all requests, one `randint(lo, hi)` output
length per request. (That is nano-vllm's benchmark with the model's whole vocabulary; PERF.md's
W1 and W2 token totals, 138,985 and 68,892, come out of it.)
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

REQUEST_SEED = 0


@dataclass(frozen=True)
class Workload:
    id: str
    command: str  # the bench subcommand that runs it: throughput | latency | serve
    model: str  # a dummy-weight preset (models/presets.py), a config.json or a model directory
    num_requests: int
    prompt_len: tuple[int, int]  # inclusive bounds of randint
    output_len: tuple[int, int]
    modified: bool = False  # scaled down or another model: not comparable with PERF.md's figures

    def describe(self) -> str:
        def span(bounds: tuple[int, int]) -> str:
            return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}..{bounds[1]}"

        return (f"{self.id}: {self.model}, {self.num_requests} request(s), prompt {span(self.prompt_len)}, "
                f"output {span(self.output_len)}{' (modified)' if self.modified else ''}")


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", "throughput", "qwen3-0.6b", 256, (100, 1024), (100, 1024)),
    "W2": Workload("W2", "throughput", "llama-3.1-8b", 128, (100, 1024), (100, 1024)),
    "W3": Workload("W3", "latency", "llama-3.1-8b", 1, (1024, 1024), (256, 256)),
    "W4": Workload("W4", "serve", "llama-3.1-8b", 64, (1024, 1024), (128, 128)),
}


@dataclass(frozen=True)
class PeerFigure:
    value: float
    unit: str  # "out tok/s" (W1, W2) or "decode tok/s" (W3)
    source: str


VLLM_SOURCE = "PERF.md, vLLM 0.21.0, H200, 2026-12-02"
VLLM_GPU = "H200"
# vLLM 0.21.0, default `LLM` settings, dummy weights, measured on an H200 (PERF.md). Only
# comparable with an unmodified workload run on an H200.
VLLM_H200: dict[str, PeerFigure] = {
    "W1": PeerFigure(13_750.0, "out tok/s", VLLM_SOURCE),
    "W2": PeerFigure(7_402.0, "out tok/s", VLLM_SOURCE),
    "W3": PeerFigure(201.2, "decode tok/s", VLLM_SOURCE),
}


def modified_workload(workload: Workload, *, model: str | None = None, num_requests: int | None = None,
                      scale: float | None = None, max_prompt_len: int | None = None,
                      max_output_len: int | None = None) -> Workload:
    """The workload with another model, request count or lengths (small CPU runs, tests).

    `scale` multiplies both length bounds (at least 1 token); `max_*_len` then caps them."""
    prompt, output = workload.prompt_len, workload.output_len
    if scale is not None:
        prompt, output = _scaled(prompt, scale), _scaled(output, scale)
    if max_prompt_len is not None:
        prompt = _capped(prompt, max_prompt_len)
    if max_output_len is not None:
        output = _capped(output, max_output_len)
    changes = dict(model=model or workload.model, num_requests=num_requests or workload.num_requests,
                   prompt_len=prompt, output_len=output)
    modified = any(getattr(workload, key) != value for key, value in changes.items())
    return dataclasses.replace(workload, **changes, modified=workload.modified or modified)


def _scaled(bounds: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(bounds[0] * scale)), max(1, round(bounds[1] * scale))


def _capped(bounds: tuple[int, int], cap: int) -> tuple[int, int]:
    return min(bounds[0], cap), min(bounds[1], cap)


@dataclass(frozen=True)
class Requests:
    prompts: list[list[int]]  # token ids
    output_lens: list[int]

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def draw_requests(workload: Workload, vocab_size: int) -> Requests:
    rng = random.Random(REQUEST_SEED)
    prompts = []
    for _ in range(workload.num_requests):
        length = rng.randint(*workload.prompt_len)
        prompts.append([rng.randint(0, vocab_size - 1) for _ in range(length)])
    output_lens = [rng.randint(*workload.output_len) for _ in range(workload.num_requests)]
    return Requests(prompts, output_lens)
