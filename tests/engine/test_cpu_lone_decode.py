"""On the CPU a lone decode runs at one token, not padded to two: MKL's GEMV instead of an SGEMM that
packs every weight (the single-stream regression of issue 13, docs/perf-notes.md), still one graph."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_engine import tiny_engine

from compiled_serve.sampling_params import SamplingParams


def test_a_lone_decode_step_runs_one_token_in_the_one_graph_with_the_padded_steps_tokens(tmp_path: Path) -> None:
    engine = tiny_engine(tmp_path)
    sizes: list[int] = []
    step_fn = engine.step_runner.step_fn

    def counting(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        sizes.append(int(input_ids.shape[0]))
        return step_fn(input_ids, positions)

    engine.step_runner.step_fn = counting
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def generate(rid: str) -> list[int]:
        engine.add_request(rid, [3, 1, 4, 1, 5, 9, 2, 6], params, output_kind="final")
        out = []
        while engine.has_unfinished_requests():
            out += [o for o in engine.step() if o.finished]
        return list(out[0].outputs[0].token_ids)

    unpadded = generate("one")
    assert sizes[0] == 8 and sizes[1:] == [1] * 7  # the prefill, then seven one-token decodes
    engine.runner.min_step_tokens = 2  # what CUDA (and the CPU before) runs: padded to two
    sizes.clear()
    padded = generate("two")
    assert sizes[1:] == [2] * 7
    assert unpadded == padded
    assert engine.compile_report.num_graphs == 1
