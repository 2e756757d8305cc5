"""_coalesce: a consumer that fell behind gets one output that loses nothing."""

from __future__ import annotations

import pytest

from compiled_serve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from compiled_serve.server.engine_loop import _coalesce


def _output(samples: dict[int, str], metrics: RequestMetrics, finished: bool = False) -> RequestOutput:
    outputs = [CompletionOutput(index=i, text=text, token_ids=list(range(len(text)))) for i, text in samples.items()]
    return RequestOutput("req", "prompt", [1, 2], outputs, finished=finished, num_cached_tokens=1, metrics=metrics)


def test_merging_samples_keeps_the_newest_fields_and_metrics() -> None:
    early = RequestMetrics(arrival_time=1.0)
    late = RequestMetrics(arrival_time=1.0, first_scheduled_time=2.0, first_token_time=3.0)
    # Each output carries only the samples that moved, so the merge must combine them.
    merged = _coalesce([_output({0: "a", 1: "b"}, early), _output({1: "bc"}, late, finished=True)])
    assert [(c.index, c.text) for c in merged.outputs] == [(0, "a"), (1, "bc")]
    assert merged.metrics == late
    assert (merged.request_id, merged.prompt, merged.prompt_token_ids) == ("req", "prompt", [1, 2])
    assert merged.finished and merged.num_cached_tokens == 1


def test_newest_complete_output_wins_and_errors_win() -> None:
    metrics = RequestMetrics(arrival_time=1.0)
    newest = _output({0: "ab"}, metrics)
    assert _coalesce([_output({0: "a"}, metrics), newest]) is newest
    with pytest.raises(RuntimeError):
        _coalesce([newest, RuntimeError("engine died")])
